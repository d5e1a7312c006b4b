//! The validated configuration: built once from a [`Config`] at start-up,
//! with durations as [`Duration`], listen addresses parsed and policies
//! loaded, so no use site converts or re-checks.

use std::collections::BTreeMap;
use std::time::Duration;

use forkd_pool::{PoolPolicy, Recycle};

use crate::config::{Config, ConfigError, MetricsListen, ZygoteSection};

/// One zygote's settings.
#[derive(Debug, Clone)]
pub struct ZygoteSettings {
    pub section: ZygoteSection,
    pub start_timeout: Duration,
    pub recycle: Recycle,
    /// `None`: no warm pool.
    pub warm: Option<PoolPolicy>,
}

/// Limits on the socket's frames.
#[derive(Debug, Clone, Copy)]
pub struct FrameLimits {
    pub max_bytes: usize,
    /// A begun frame must complete within this.
    pub timeout: Duration,
}

/// Everything the daemon reads from its configuration, validated.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The configuration as written (for what is passed on unchanged:
    /// cgroup settings, hostname, audit options).
    pub config: Config,
    pub policies: BTreeMap<String, forkd_zygote::Policy>,
    pub zygotes: Vec<ZygoteSettings>,
    pub max_concurrent: usize,
    pub shutdown_grace: Duration,
    pub frames: FrameLimits,
    pub metrics_listen: Option<MetricsListen>,
}

impl Settings {
    /// Validates `config` and loads its policies.
    pub fn new(config: Config) -> Result<Settings, ConfigError> {
        config.validate()?;
        let policies = config.load_policies()?;
        let metrics_listen = config.metrics()?;
        let zygotes = config
            .zygote_sections()
            .into_iter()
            .map(|z| {
                let (min, max) = z.warm_pool_bounds();
                ZygoteSettings {
                    start_timeout: Duration::from_secs(z.start_timeout_secs),
                    recycle: Recycle {
                        max_forks: z.max_forks,
                        max_age: z.max_age_secs.map(Duration::from_secs),
                    },
                    warm: (max > 0).then(|| PoolPolicy {
                        target: z.warm_pool,
                        min,
                        max,
                        shrink_after: Duration::from_secs(z.warm_shrink_after_secs),
                        refill_concurrency: z.warm_refill_concurrency,
                        max_idle: z.warm_max_idle_secs.map(Duration::from_secs),
                    }),
                    section: z,
                }
            })
            .collect();
        Ok(Settings {
            max_concurrent: config.max_concurrent,
            shutdown_grace: Duration::from_millis(config.shutdown_grace_ms),
            frames: FrameLimits {
                max_bytes: config.max_frame_bytes,
                timeout: Duration::from_millis(config.frame_timeout_ms),
            },
            metrics_listen,
            zygotes,
            policies,
            config,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_pools_come_from_the_config() {
        let c = Config::from_toml(
            "shutdown_grace_ms = 1500\nframe_timeout_ms = 250\n[[zygote]]\nname = \"z\"\nwarm_pool = 4\nwarm_max_idle_secs = 9\ndefault_zygote = \"z\"\n",
        );
        // default_zygote after a table belongs to the table: put it first.
        assert!(c.is_err());
        let c = Config::from_toml(
            "default_zygote = \"z\"\nshutdown_grace_ms = 1500\nframe_timeout_ms = 250\n[[zygote]]\nname = \"z\"\nwarm_pool = 4\nwarm_max_idle_secs = 9\n",
        )
        .expect("config");
        let s = Settings::new(c).expect("valid");
        assert_eq!(s.shutdown_grace, Duration::from_millis(1500));
        assert_eq!(s.frames.timeout, Duration::from_millis(250));
        let warm = s.zygotes[0].warm.as_ref().expect("a warm pool");
        assert_eq!(
            (warm.target, warm.max_idle),
            (4, Some(Duration::from_secs(9)))
        );
        assert!(s.policies.contains_key("default"));
    }

    #[test]
    fn an_invalid_config_yields_no_settings() {
        let c = Config {
            max_concurrent: 0,
            ..Config::default()
        };
        assert!(Settings::new(c).is_err());
    }
}
