//! forkd's network egress.
//!
//! A sandbox has an empty network namespace unless its request carries an
//! allowlist (`allow_net`). [`spec`] parses the allowlist's entries,
//! [`bound`] checks them against the operator's `[network]` bound, [`dns`]
//! decides what the sandbox's resolver answers, and [`egress`] enforces it all
//! for one sandbox: routes, listeners and the proxy (see its docs).

pub mod bound;
pub mod dns;
pub mod egress;
pub mod spec;
pub mod sys;

pub use bound::{AdmitError, Allowlist, Bound, Refusal};
pub use egress::{Config, Egress, EgressError, Enforcer};
pub use spec::{Cidr, PortRange, Rule, SpecError, Target};
