//! Rules: ordered `GLOB=MODE` pairs over paths relative to the workspace,
//! and the precedence that picks one mode for every path.
//!
//! # Patterns
//! A pattern is a `/`-separated path relative to the workspace root (a
//! leading `/` or `./` is ignored, a trailing `/` too). It is matched
//! component by component against the whole relative path:
//! `*` matches any run of characters within one component, `?` one
//! character, `[abc]`/`[a-z]`/`[!a]` one character of (not of) a set, `\x`
//! the character `x`, and a component `**` any number (zero or more) of
//! components. `.` and `..` components are refused, as are empty patterns.
//! A rule that matches a directory covers everything beneath it, so `secrets`
//! and `secrets/**` mean the same; `*.env` matches only at the top level
//! (write `**/*.env` for every depth).
//!
//! # Precedence ("most specific match wins; ties: later rule wins")
//! For a path `p`, each rule matches at most one *anchor*: the deepest of `p`
//! and its ancestors that its pattern (without a trailing `**`) matches. The
//! rule's specificity for `p` is the pair, compared in order:
//! 1. the anchor's depth (number of components; the workspace root is 0):
//!    a rule naming `p` itself beats one naming its directory;
//! 2. the number of the pattern's components that hold no wildcard
//!    (`config/app.env` beats `**/*.env`, `src/*.py` beats `**/*.py`).
//!
//! The highest specificity wins; among equals the rule given last wins. A
//! path no rule matches gets the default mode. Finally `none` is final for a
//! subtree: a path beneath a `none` path is `none` whatever rule matches it
//! (the sandbox cannot reach it through the hidden directory anyway), and
//! [`Rules::explain`] names the hiding ancestor.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// What the sandbox may do with a path, weakest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Absent: not listed, `ENOENT` on open.
    None,
    /// Listed and stat-able; opening its content fails with `EACCES`.
    View,
    /// Readable, not writable.
    Read,
    /// Readable and writable (create, rename, delete within write areas).
    Write,
}

impl Mode {
    pub const ALL: [Mode; 4] = [Mode::None, Mode::View, Mode::Read, Mode::Write];

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::None => "none",
            Mode::View => "view",
            Mode::Read => "read",
            Mode::Write => "write",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Mode {
    type Err = RuleError;
    fn from_str(s: &str) -> Result<Self, RuleError> {
        match s {
            "none" => Ok(Mode::None),
            "view" => Ok(Mode::View),
            "read" => Ok(Mode::Read),
            "write" => Ok(Mode::Write),
            other => Err(RuleError::BadMode(other.to_string())),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    #[error("unknown mode `{0}`: use none, view, read or write")]
    BadMode(String),
    #[error("rule `{0}` has no `=`: write GLOB=MODE, e.g. `secrets/**=none`")]
    NoEquals(String),
    #[error(
        "pattern `{0}` is empty: name a path relative to the workspace, or `**` for all of it"
    )]
    Empty(String),
    #[error("pattern `{0}` has a `.` or `..` component: patterns are relative to the workspace root and cannot leave it")]
    DotComponent(String),
    #[error("pattern `{0}` has an unterminated `[` set or a trailing `\\`")]
    BadSyntax(String),
    #[error("path `{0}` is not a relative path inside the workspace (no `..`, no empty or NUL components)")]
    BadPath(String),
}

/// One compiled pattern component.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    /// `**`: zero or more components.
    AnyDepth,
    /// A component glob (tokens) and whether it holds a wildcard.
    Glob { tokens: Vec<Tok>, literal: bool },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Char(u8),
    Any,  // ?
    Star, // *
    Set { negated: bool, items: Vec<(u8, u8)> },
}

/// A compiled `GLOB=MODE` rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// The pattern as written (normalized: no leading `/`, `./` or trailing `/`).
    pub pattern: String,
    pub mode: Mode,
    /// Components, with a trailing `**` removed (it adds nothing: a match
    /// covers the subtree).
    parts: Vec<Part>,
    literal_parts: usize,
}

impl Rule {
    pub fn new(pattern: &str, mode: Mode) -> Result<Rule, RuleError> {
        let mut p = pattern.trim_start_matches('/');
        while let Some(rest) = p.strip_prefix("./") {
            p = rest.trim_start_matches('/');
        }
        let p = p.trim_end_matches('/');
        if p.is_empty() {
            return Err(RuleError::Empty(pattern.to_string()));
        }
        let mut parts = Vec::new();
        for comp in p.split('/').filter(|c| !c.is_empty()) {
            if comp == "." || comp == ".." {
                return Err(RuleError::DotComponent(pattern.to_string()));
            }
            if comp == "**" {
                if parts.last() != Some(&Part::AnyDepth) {
                    parts.push(Part::AnyDepth);
                }
                continue;
            }
            let tokens =
                compile_component(comp).ok_or(RuleError::BadSyntax(pattern.to_string()))?;
            let literal = tokens.iter().all(|t| matches!(t, Tok::Char(_)));
            parts.push(Part::Glob { tokens, literal });
        }
        if parts.last() == Some(&Part::AnyDepth) {
            parts.pop();
        }
        let literal_parts = parts
            .iter()
            .filter(|p| matches!(p, Part::Glob { literal: true, .. }))
            .count();
        Ok(Rule {
            pattern: p.to_string(),
            mode,
            parts,
            literal_parts,
        })
    }

    /// Does the pattern (without its trailing `**`) match exactly these components?
    pub fn matches(&self, comps: &[&[u8]]) -> bool {
        match_parts(&self.parts, comps)
    }
}

impl FromStr for Rule {
    type Err = RuleError;
    /// Parses `GLOB=MODE`; the last `=` separates them, so patterns may hold `=`.
    fn from_str(s: &str) -> Result<Rule, RuleError> {
        let (glob, mode) = s
            .rsplit_once('=')
            .ok_or_else(|| RuleError::NoEquals(s.to_string()))?;
        Rule::new(glob, mode.trim().parse()?)
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.pattern, self.mode)
    }
}

fn compile_component(comp: &str) -> Option<Vec<Tok>> {
    let b = comp.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'*' => {
                if out.last() != Some(&Tok::Star) {
                    out.push(Tok::Star);
                }
                i += 1;
            }
            b'?' => {
                out.push(Tok::Any);
                i += 1;
            }
            b'\\' => {
                out.push(Tok::Char(*b.get(i + 1)?));
                i += 2;
            }
            b'[' => {
                let mut j = i + 1;
                let negated = matches!(b.get(j), Some(b'!') | Some(b'^'));
                if negated {
                    j += 1;
                }
                let mut items = Vec::new();
                let mut first = true;
                loop {
                    let c = *b.get(j)?;
                    if c == b']' && !first {
                        j += 1;
                        break;
                    }
                    first = false;
                    if b.get(j + 1) == Some(&b'-') && b.get(j + 2).is_some_and(|&e| e != b']') {
                        items.push((c, b[j + 2]));
                        j += 3;
                    } else {
                        items.push((c, c));
                        j += 1;
                    }
                }
                out.push(Tok::Set { negated, items });
                i = j;
            }
            c => {
                out.push(Tok::Char(c));
                i += 1;
            }
        }
    }
    Some(out)
}

fn match_tokens(toks: &[Tok], s: &[u8]) -> bool {
    // Iterative wildcard matching with one backtrack point (the last `*`).
    let (mut t, mut i) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while i < s.len() {
        let ok = match toks.get(t) {
            Some(Tok::Char(c)) => *c == s[i],
            Some(Tok::Any) => true,
            Some(Tok::Set { negated, items }) => {
                items.iter().any(|&(a, b)| a <= s[i] && s[i] <= b) != *negated
            }
            Some(Tok::Star) => {
                star = Some((t, i));
                t += 1;
                continue;
            }
            None => false,
        };
        if ok {
            t += 1;
            i += 1;
        } else if let Some((st, si)) = star {
            t = st + 1;
            i = si + 1;
            star = Some((st, si + 1));
        } else {
            return false;
        }
    }
    toks[t..].iter().all(|t| *t == Tok::Star)
}

fn match_parts(parts: &[Part], comps: &[&[u8]]) -> bool {
    match parts.split_first() {
        None => comps.is_empty(),
        Some((Part::AnyDepth, rest)) => (0..=comps.len()).any(|k| match_parts(rest, &comps[k..])),
        Some((Part::Glob { tokens, .. }, rest)) => match comps.split_first() {
            Some((c, more)) => match_tokens(tokens, c) && match_parts(rest, more),
            None => false,
        },
    }
}

/// Splits a relative path into components, refusing anything that could
/// leave the workspace.
pub fn components(path: &str) -> Result<Vec<&[u8]>, RuleError> {
    let mut p = path.trim_start_matches('/');
    while let Some(rest) = p.strip_prefix("./") {
        p = rest.trim_start_matches('/');
    }
    let p = p.trim_end_matches('/');
    if p.is_empty() || p == "." {
        return Ok(Vec::new());
    }
    p.split('/')
        .filter(|c| !c.is_empty())
        .map(|c| {
            if c == "." || c == ".." || c.contains('\0') {
                Err(RuleError::BadPath(path.to_string()))
            } else {
                Ok(c.as_bytes())
            }
        })
        .collect()
}

/// Why a path has its mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// No rule matched: the default mode.
    Default,
    /// Rule number `index` (0-based, in the order given) won.
    Rule { index: usize, rule: Rule },
    /// An ancestor is `none`; `ancestor` is that path and `by` why it is.
    HiddenBy { ancestor: String, by: Box<Reason> },
    /// The ceiling (a configured workspace's own rules) allows less than the
    /// request's rules; `by` is the ceiling's reason.
    Ceiling { by: Box<Reason> },
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Default => f.write_str("default (no rule matches)"),
            Reason::Rule { index, rule } => write!(f, "rule {} `{rule}`", index + 1),
            Reason::HiddenBy { ancestor, by } => {
                write!(f, "inside `{ancestor}`, which is none by {by}")
            }
            Reason::Ceiling { by } => write!(f, "the configured workspace's {by}"),
        }
    }
}

/// The winning rule's key for one path: (anchor depth, literal parts, index).
type Key = (usize, usize, usize);

/// The winning keys of a rule set and of its ceiling, carried down a walk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Keys {
    own: Option<Key>,
    ceiling: Option<Key>,
}

/// A rule set: the ordered rules, the mode of unmatched paths, and
/// optionally a ceiling: another rule set (a configured workspace's) whose
/// mode for a path is the most this one can give (the lower mode wins).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    pub rules: Vec<Rule>,
    pub default: Mode,
    pub ceiling: Option<Box<Rules>>,
}

impl Rules {
    pub fn new(rules: Vec<Rule>, default: Mode) -> Rules {
        Rules {
            rules,
            default,
            ceiling: None,
        }
    }

    /// These rules, never granting more than `ceiling` does.
    pub fn with_ceiling(mut self, ceiling: Rules) -> Rules {
        self.ceiling = Some(Box::new(ceiling));
        self
    }

    fn modes(&self) -> impl Iterator<Item = Mode> + '_ {
        std::iter::once(self.default).chain(self.rules.iter().map(|r| r.mode))
    }

    /// Could any path be `view`? (Conservative.)
    pub fn may_view(&self) -> bool {
        self.modes().any(|m| m == Mode::View)
    }

    /// Could any path be `write`? (Conservative.)
    pub fn may_write(&self) -> bool {
        self.modes().any(|m| m == Mode::Write)
            && self.ceiling.as_ref().is_none_or(|c| c.may_write())
    }

    /// Keys of `comps` given its parent's.
    pub(crate) fn step(&self, parent: Keys, comps: &[&[u8]]) -> Keys {
        Keys {
            own: parent.own.max(self.best_exact(comps)),
            ceiling: self
                .ceiling
                .as_ref()
                .and_then(|c| parent.ceiling.max(c.best_exact(comps))),
        }
    }

    /// The mode keys stand for (ceiling applied).
    pub(crate) fn mode_at(&self, keys: Keys) -> Mode {
        let own = self.mode_of(keys.own);
        match &self.ceiling {
            Some(c) => own.min(c.mode_of(keys.ceiling)),
            None => own,
        }
    }

    /// Parses `GLOB=MODE` strings.
    pub fn parse<S: AsRef<str>>(rules: &[S], default: Mode) -> Result<Rules, RuleError> {
        let rules = rules
            .iter()
            .map(|r| r.as_ref().parse())
            .collect::<Result<_, _>>()?;
        Ok(Rules::new(rules, default))
    }

    /// The best rule matching exactly `comps` (as anchor), if any.
    pub(crate) fn best_exact(&self, comps: &[&[u8]]) -> Option<Key> {
        self.best_exact_in(comps, 0..self.rules.len())
    }

    /// [`Self::best_exact`] among the rules numbered `among`.
    fn best_exact_in(
        &self,
        comps: &[&[u8]],
        among: impl IntoIterator<Item = usize>,
    ) -> Option<Key> {
        let depth = comps.len();
        let mut best: Option<Key> = None;
        for index in among {
            let rule = &self.rules[index];
            if rule.matches(comps) {
                let key = (depth, rule.literal_parts, index);
                if best.is_none_or(|b| key > b) {
                    best = Some(key);
                }
            }
        }
        best
    }

    /// The mode a key stands for.
    pub(crate) fn mode_of(&self, key: Option<Key>) -> Mode {
        key.map_or(self.default, |(_, _, i)| self.rules[i].mode)
    }

    /// The raw winner for `comps`, ignoring `none` ancestors.
    fn winner(&self, comps: &[&[u8]]) -> Option<Key> {
        (0..=comps.len())
            .filter_map(|k| self.best_exact(&comps[..k]))
            .max()
    }

    fn reason(&self, key: Option<Key>) -> Reason {
        match key {
            None => Reason::Default,
            Some((_, _, index)) => Reason::Rule {
                index,
                rule: self.rules[index].clone(),
            },
        }
    }

    /// The mode of `path` (relative to the workspace) and the reason for it.
    pub fn explain(&self, path: &str) -> Result<(Mode, Reason), RuleError> {
        let own = self.explain_own(path)?;
        if let Some(c) = &self.ceiling {
            let (mode, by) = c.explain(path)?;
            if mode < own.0 {
                return Ok((mode, Reason::Ceiling { by: Box::new(by) }));
            }
        }
        Ok(own)
    }

    fn explain_own(&self, path: &str) -> Result<(Mode, Reason), RuleError> {
        let comps = components(path)?;
        // A hidden ancestor (or the root) decides first.
        for k in 0..comps.len() {
            let key = self.winner(&comps[..k]);
            if self.mode_of(key) == Mode::None {
                let ancestor = if k == 0 {
                    ".".to_string()
                } else {
                    comps[..k]
                        .iter()
                        .map(|c| String::from_utf8_lossy(c))
                        .collect::<Vec<_>>()
                        .join("/")
                };
                return Ok((
                    Mode::None,
                    Reason::HiddenBy {
                        ancestor,
                        by: Box::new(self.reason(key)),
                    },
                ));
            }
        }
        let key = self.winner(&comps);
        Ok((self.mode_of(key), self.reason(key)))
    }

    /// The mode of `path` alone.
    pub fn mode(&self, path: &str) -> Result<Mode, RuleError> {
        Ok(self.explain(path)?.0)
    }

    /// Whether some rule could match a path strictly beneath `comps` (a
    /// directory): lets a walk skip subtrees no rule reaches.
    #[cfg(test)]
    pub(crate) fn may_match_below(&self, comps: &[&[u8]]) -> bool {
        !self.cands_below(&self.all_cands(), comps).is_empty()
    }

    /// Every rule (and ceiling rule) as a candidate.
    pub(crate) fn all_cands(&self) -> Cands {
        Cands {
            own: (0..self.rules.len()).collect(),
            ceiling: self
                .ceiling
                .as_ref()
                .map(|c| (0..c.rules.len()).collect())
                .unwrap_or_default(),
        }
    }

    /// Of the candidates `c` of a directory's parent, those that could match
    /// some path strictly beneath the directory `comps`: a walk evaluates
    /// only these for its entries, and skips a directory that has none.
    pub(crate) fn cands_below(&self, c: &Cands, comps: &[&[u8]]) -> Cands {
        let keep = |rules: &Rules, idx: &[usize]| -> Vec<usize> {
            idx.iter()
                .copied()
                .filter(|&i| prefix_may_match(&rules.rules[i].parts, comps))
                .collect()
        };
        Cands {
            own: keep(self, &c.own),
            ceiling: self
                .ceiling
                .as_ref()
                .map(|ceil| keep(ceil, &c.ceiling))
                .unwrap_or_default(),
        }
    }

    /// [`Self::step`] evaluating only the candidates `c` (from
    /// [`Self::cands_below`] of the entry's directory).
    pub(crate) fn step_in(&self, parent: Keys, comps: &[&[u8]], c: &Cands) -> Keys {
        Keys {
            own: parent
                .own
                .max(self.best_exact_in(comps, c.own.iter().copied())),
            ceiling: self.ceiling.as_ref().and_then(|ceil| {
                parent
                    .ceiling
                    .max(ceil.best_exact_in(comps, c.ceiling.iter().copied()))
            }),
        }
    }
}

/// Rule numbers still able to match below a directory (own and ceiling).
#[derive(Debug, Clone, Default)]
pub(crate) struct Cands {
    own: Vec<usize>,
    ceiling: Vec<usize>,
}

impl Cands {
    pub(crate) fn is_empty(&self) -> bool {
        self.own.is_empty() && self.ceiling.is_empty()
    }
}

/// Could `parts` match some path that starts with `comps` and is longer?
fn prefix_may_match(parts: &[Part], comps: &[&[u8]]) -> bool {
    match parts.split_first() {
        None => false,
        Some((Part::AnyDepth, _)) => true,
        Some((Part::Glob { tokens, .. }, rest)) => match comps.split_first() {
            None => true,
            Some((c, more)) => match_tokens(tokens, c) && prefix_may_match(rest, more),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(r: &[&str], default: Mode) -> Rules {
        Rules::parse(r, default).unwrap()
    }

    #[test]
    fn glob_components() {
        let m = |pat: &str, path: &str| {
            Rule::new(pat, Mode::Read)
                .unwrap()
                .matches(&components(path).unwrap())
        };
        assert!(m("*.env", "a.env"));
        assert!(!m("*.env", "dir/a.env"), "`*` stays within one component");
        assert!(m("**/*.env", "a.env"), "`**` matches zero components");
        assert!(m("**/*.env", "x/y/a.env"));
        assert!(m("src/?.py", "src/a.py"));
        assert!(!m("src/?.py", "src/ab.py"));
        assert!(m("[a-c]x", "bx"));
        assert!(!m("[!a-c]x", "bx"));
        assert!(m("[!a-c]x", "dx"));
        assert!(m("a\\*b", "a*b"));
        assert!(!m("a\\*b", "axb"));
        assert!(m("a/**/b", "a/b"));
        assert!(m("a/**/b", "a/x/y/b"));
        assert!(!m("a/**/b", "a/x/y/c"));
        assert!(m("*a*b*", "xaybz"));
        assert!(!m("*a*b*", "xbya"));
        assert!(m("/lead/", "lead"), "leading / and trailing / are ignored");
    }

    #[test]
    fn bad_rules_are_refused_with_a_reason() {
        assert_eq!(
            "x=maybe".parse::<Rule>(),
            Err(RuleError::BadMode("maybe".into()))
        );
        assert!(matches!("x".parse::<Rule>(), Err(RuleError::NoEquals(_))));
        assert!(matches!("=read".parse::<Rule>(), Err(RuleError::Empty(_))));
        assert!(matches!(
            "../x=read".parse::<Rule>(),
            Err(RuleError::DotComponent(_))
        ));
        assert!(matches!(
            "a/[b=read".parse::<Rule>(),
            Err(RuleError::BadSyntax(_))
        ));
        let r = rules(&[], Mode::Read);
        assert!(matches!(r.explain("a/../b"), Err(RuleError::BadPath(_))));
        assert_eq!("a=b=write".parse::<Rule>().unwrap().pattern, "a=b");
    }

    #[test]
    fn default_applies_when_nothing_matches() {
        let r = rules(&["secrets=none"], Mode::Read);
        assert_eq!(
            r.explain("src/main.rs").unwrap(),
            (Mode::Read, Reason::Default)
        );
        let r = rules(&[], Mode::View);
        assert_eq!(r.mode("x").unwrap(), Mode::View);
        assert_eq!(r.mode("").unwrap(), Mode::View, "the root itself");
    }

    #[test]
    fn deeper_anchor_wins() {
        let r = rules(&["out/keep=read", "out=write"], Mode::Read);
        // out/keep names the path itself, out only its directory.
        assert_eq!(r.mode("out/keep").unwrap(), Mode::Read);
        assert_eq!(r.mode("out/keep/deeper").unwrap(), Mode::Read);
        assert_eq!(r.mode("out/other").unwrap(), Mode::Write);
        // A trailing ** anchors at the directory, so the named file still wins.
        let r = rules(&["a/b=write", "a/**=view"], Mode::Read);
        assert_eq!(r.mode("a/b/c").unwrap(), Mode::Write);
        assert_eq!(r.mode("a/x").unwrap(), Mode::View);
        // A glob naming the file beats a literal naming its directory.
        let r = rules(&["**/*.key=none", "config=read"], Mode::Write);
        assert_eq!(r.mode("config/tls.key").unwrap(), Mode::None);
        assert_eq!(r.mode("config/app.toml").unwrap(), Mode::Read);
    }

    #[test]
    fn literal_components_break_depth_ties() {
        let r = rules(&["config/app.env=read", "**/*.env=none"], Mode::Write);
        assert_eq!(r.mode("config/app.env").unwrap(), Mode::Read);
        assert_eq!(r.mode("other/app.env").unwrap(), Mode::None);
        let r = rules(&["src/*.py=write", "**/*.py=view"], Mode::Read);
        assert_eq!(r.mode("src/a.py").unwrap(), Mode::Write);
        assert_eq!(r.mode("lib/a.py").unwrap(), Mode::View);
    }

    #[test]
    fn later_rule_wins_a_tie() {
        let r = rules(&["a=read", "a/**=write"], Mode::View);
        let (mode, why) = r.explain("a/f").unwrap();
        assert_eq!(mode, Mode::Write);
        assert!(matches!(why, Reason::Rule { index: 1, .. }));
        let r = rules(&["a/**=write", "a=read"], Mode::View);
        assert_eq!(r.mode("a/f").unwrap(), Mode::Read);
        let r = rules(&["**/x=view", "*/x=read"], Mode::Write);
        assert_eq!(r.mode("d/x").unwrap(), Mode::Read, "one literal part each");
    }

    #[test]
    fn none_hides_its_subtree() {
        let r = rules(&["secrets=none", "secrets/public.txt=read"], Mode::Read);
        let (mode, why) = r.explain("secrets/public.txt").unwrap();
        assert_eq!(mode, Mode::None);
        match why {
            Reason::HiddenBy { ancestor, by } => {
                assert_eq!(ancestor, "secrets");
                assert!(matches!(*by, Reason::Rule { index: 0, .. }));
            }
            other => panic!("{other:?}"),
        }
        // A none default hides everything, the root included.
        let r = rules(&["src=read"], Mode::None);
        assert_eq!(r.mode("src/a").unwrap(), Mode::None);
        // view and read directories may hold more permissive paths.
        let r = rules(&["docs=view", "docs/README=read"], Mode::Read);
        assert_eq!(r.mode("docs/README").unwrap(), Mode::Read);
        assert_eq!(r.mode("docs/other").unwrap(), Mode::View);
    }

    #[test]
    fn explain_names_the_rule() {
        let r = rules(&["**=read", "out/**=write", ".env=none"], Mode::View);
        let (mode, why) = r.explain(".env").unwrap();
        assert_eq!(mode, Mode::None);
        assert_eq!(why.to_string(), "rule 3 `.env=none`");
        let (mode, why) = r.explain("out/a/b").unwrap();
        assert_eq!(
            (mode, why.to_string()),
            (Mode::Write, "rule 2 `out/**=write`".into())
        );
        assert_eq!(
            r.mode("src").unwrap(),
            Mode::Read,
            "`**` anchors at the root"
        );
    }

    #[test]
    fn a_ceiling_caps_the_request() {
        let operator = rules(&["secrets=none", "out=write"], Mode::Read);
        let r = rules(&["secrets=read", "**=write", "out/tmp=view"], Mode::Write)
            .with_ceiling(operator);
        let (mode, why) = r.explain("secrets/key").unwrap();
        assert_eq!(mode, Mode::None);
        assert!(matches!(why, Reason::Ceiling { .. }), "{why}");
        assert_eq!(
            r.mode("src/a").unwrap(),
            Mode::Read,
            "the request cannot widen read to write"
        );
        assert_eq!(r.mode("out/a").unwrap(), Mode::Write);
        assert_eq!(
            r.mode("out/tmp/x").unwrap(),
            Mode::View,
            "narrowing is fine"
        );
        assert!(r.may_write());
        let ro = rules(&["**=write"], Mode::Write).with_ceiling(rules(&[], Mode::Read));
        assert!(!ro.may_write());
        // A walk must reach what only the ceiling names.
        let r = rules(&[], Mode::Read).with_ceiling(rules(&["secrets/key=none"], Mode::Read));
        assert!(r.may_match_below(&components("secrets").unwrap()));
        assert!(r.may_match_below(&[]));
    }

    #[test]
    fn walk_pruning_is_conservative() {
        let r = rules(&["secrets/**=none", "**/*.env=none"], Mode::Read);
        assert!(
            r.may_match_below(&components("src").unwrap()),
            "**/ reaches everywhere"
        );
        let r = rules(&["secrets/x=none"], Mode::Read);
        assert!(!r.may_match_below(&components("src").unwrap()));
        assert!(r.may_match_below(&components("secrets").unwrap()));
        assert!(!r.may_match_below(&components("secrets/x").unwrap()));
    }
}
