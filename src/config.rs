//! Node configuration: defaults < TOML file < `RAFTMQ_*` environment < flags.
//!
//! Owns the shape of the configuration file and how its layers combine; the
//! sections themselves are defined by the modules that use them
//! (`broker::BrokerConfig`, `listener::ListenerConfig`, `admin::AdminConfig`).
//! With no configuration at all the node is a working single-node broker bound
//! to localhost only, as Mosquitto 2 does.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use serde::Deserialize;

use crate::admin::AdminConfig;
use crate::backup::BackupConfig;
use crate::broker::BrokerConfig;
use crate::listener::{ListenerConfig, ListenerKind};
use crate::raft::ClusterConfig;

/// Environment variables with this prefix override file keys; `__` separates
/// sections: `RAFTMQ_MQTT__MAX_PACKET_SIZE=65536`.
pub const ENV_PREFIX: &str = "RAFTMQ_";

/// Variables with the prefix that belong to the CLI client, not to a node.
const ENV_NOT_CONFIG: &[&str] = &["token", "url", "log"];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration file {path} does not exist")]
    Missing { path: PathBuf },
    #[error("invalid configuration: {0}")]
    Invalid(#[from] Box<figment::Error>),
    #[error("invalid configuration: {0}")]
    Rule(String),
}

/// The whole configuration of one node.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Config {
    /// This node's id in the cluster (1 for a single node).
    pub node_id: u64,
    /// Where the node keeps its state.
    pub data_dir: PathBuf,
    /// Broker behaviour and limits.
    pub mqtt: BrokerConfig,
    /// MQTT listeners; when empty, one TCP listener on 127.0.0.1:1883.
    pub listeners: Vec<ListenerConfig>,
    /// Admin HTTP (health, metrics, REST API).
    pub admin: AdminConfig,
    /// Raft: this node's cluster listener, the static list of nodes, timings, TLS.
    pub cluster: ClusterConfig,
    /// Dynamic security bootstrap (the first admin).
    pub dynsec: crate::auth::DynsecConfig,
    /// Backups: folder, schedule, retention.
    pub backup: BackupConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            node_id: 1,
            data_dir: PathBuf::from("./data"),
            mqtt: BrokerConfig::default(),
            listeners: Vec::new(),
            admin: AdminConfig::default(),
            // No `nodes`: a single node, a Raft group of one (see node.rs).
            cluster: ClusterConfig { nodes: Vec::new(), ..ClusterConfig::default() },
            dynsec: crate::auth::DynsecConfig::default(),
            backup: BackupConfig::default(),
        }
    }
}

/// Values given on the command line; each one, when set, wins over every other layer.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub mqtt_listen: Option<SocketAddr>,
    pub admin_listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
}

/// The address of the listener used when the configuration names none.
pub fn default_mqtt_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 1883))
}

impl Config {
    /// Loads the layers in order and checks the result.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        // Every section is `#[serde(default)]`, so an empty figment is the default configuration.
        let mut figment = Figment::new();
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError::Missing { path: path.to_path_buf() });
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        figment = figment.merge(Env::prefixed(ENV_PREFIX).split("__").ignore(ENV_NOT_CONFIG));
        let mut config: Config = figment.extract().map_err(Box::new)?;
        if figment.find_value("cluster.nodes").is_err() {
            // A `[cluster]` section without `nodes` (timings only) is still a single node.
            config.cluster.nodes.clear();
        }
        config.apply(overrides);
        config.validate()?;
        Ok(config)
    }

    fn apply(&mut self, overrides: &Overrides) {
        if self.listeners.is_empty() {
            self.listeners.push(ListenerConfig::default());
        }
        if let Some(addr) = overrides.mqtt_listen {
            // The flag moves the first plain TCP listener (the common case of one listener).
            match self.listeners.iter_mut().find(|l| l.kind == ListenerKind::Tcp) {
                Some(listener) => listener.bind = addr,
                None => self.listeners.push(ListenerConfig { bind: addr, ..ListenerConfig::default() }),
            }
        }
        if let Some(addr) = overrides.admin_listen {
            self.admin.listen = addr;
        }
        if let Some(dir) = &overrides.data_dir {
            self.data_dir = dir.clone();
        }
        // One id per node: the top-level key is the one users set.
        self.cluster.node_id = self.node_id;
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let mut names = std::collections::BTreeSet::new();
        for listener in &self.listeners {
            if !names.insert(listener.name.as_str()) {
                return Err(ConfigError::Rule(format!("two listeners are named {:?}", listener.name)));
            }
        }
        if self.node_id == 0 {
            return Err(ConfigError::Rule("node_id must be at least 1".into()));
        }
        self.validate_cluster()
    }

    /// `[cluster]`: no `nodes` = a single node; otherwise a static list this
    /// node is in (unless `join`), with distinct ids and addresses.
    fn validate_cluster(&self) -> Result<(), ConfigError> {
        let c = &self.cluster;
        let rule = |m: String| Err(ConfigError::Rule(format!("[cluster] {m}")));
        if c.nodes.is_empty() {
            if c.join {
                return rule("join = true needs the `nodes` of the cluster to join".into());
            }
            // Timings still apply to the group of one.
            let mut one = c.clone();
            one.nodes = vec![crate::raft::NodeInfo {
                id: c.node_id,
                cluster_addr: c.listen.clone(),
                mqtt_addr: String::new(),
                admin_addr: String::new(),
            }];
            return one.validate().map_err(|e| ConfigError::Rule(format!("[cluster] {e}")));
        }
        if !valid_host_port(&c.listen) {
            return rule(format!("listen = {:?} is not host:port", c.listen));
        }
        let mut seen = std::collections::BTreeSet::new();
        for n in &c.nodes {
            if n.id == 0 {
                return rule("node ids must be at least 1".into());
            }
            for (key, addr) in [
                ("cluster_addr", &n.cluster_addr),
                ("mqtt_addr", &n.mqtt_addr),
                ("admin_addr", &n.admin_addr),
            ] {
                if !valid_host_port(addr) {
                    return rule(format!("node {}: {key} = {addr:?} is not host:port", n.id));
                }
                if !seen.insert((key, addr.as_str())) {
                    return rule(format!("node {}: {key} {addr} is used by another node too", n.id));
                }
            }
        }
        c.validate().map_err(|e| ConfigError::Rule(format!("[cluster] {e}")))
    }
}

/// `host:port` with a non-zero port (a host name, IPv4, or `[IPv6]`).
fn valid_host_port(s: &str) -> bool {
    match s.rsplit_once(':') {
        Some((host, port)) => {
            !host.is_empty()
                && !host.contains(char::is_whitespace)
                && port.parse::<u16>().is_ok_and(|p| p > 0)
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_configuration_is_a_localhost_broker() {
        let config = Config::load(None, &Overrides::default()).unwrap();
        assert_eq!(config.listeners.len(), 1);
        assert_eq!(config.listeners[0].bind, default_mqtt_listen());
        assert_eq!(config.admin.listen, SocketAddr::from(([127, 0, 0, 1], 8080)));
        assert_eq!(config.data_dir, PathBuf::from("./data"));
    }

    #[test]
    fn flags_win_over_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raftmq.toml");
        std::fs::write(
            &path,
            "data_dir = \"/var/lib/x\"\n[admin]\nlisten = \"127.0.0.1:9000\"\n[mqtt]\nmax_packet_size = 4096\n",
        )
        .unwrap();
        let overrides = Overrides {
            data_dir: Some(PathBuf::from("/tmp/y")),
            mqtt_listen: Some("127.0.0.1:1999".parse().unwrap()),
            ..Default::default()
        };
        let config = Config::load(Some(&path), &overrides).unwrap();
        assert_eq!(config.data_dir, PathBuf::from("/tmp/y"));
        assert_eq!(config.admin.listen, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(config.listeners[0].bind, "127.0.0.1:1999".parse().unwrap());
        assert_eq!(config.mqtt.max_packet_size, 4096);
    }

    #[test]
    fn missing_file_and_bad_keys_are_clear_errors() {
        let err = Config::load(Some(Path::new("/nonexistent/raftmq.toml")), &Overrides::default());
        assert!(matches!(err, Err(ConfigError::Missing { .. })));

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raftmq.toml");
        std::fs::write(&path, "[mqtt]\nmax_packet_size = \"big\"\n").unwrap();
        let err = Config::load(Some(&path), &Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("max_packet_size"), "{err}");
    }

    fn load_str(toml: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raftmq.toml");
        std::fs::write(&path, toml).unwrap();
        Config::load(Some(&path), &Overrides::default())
    }

    const THREE: &str = r#"
node_id = 2
[cluster]
listen = "127.0.0.1:22084"
nodes = [
  { id = 1, cluster_addr = "127.0.0.1:22083", mqtt_addr = "127.0.0.1:21883", admin_addr = "127.0.0.1:21983" },
  { id = 2, cluster_addr = "127.0.0.1:22084", mqtt_addr = "127.0.0.1:21884", admin_addr = "127.0.0.1:21984" },
  { id = 3, cluster_addr = "127.0.0.1:22085", mqtt_addr = "127.0.0.1:21885", admin_addr = "127.0.0.1:21985" },
]
"#;

    #[test]
    fn no_cluster_nodes_is_a_single_node() {
        assert!(Config::load(None, &Overrides::default()).unwrap().cluster.nodes.is_empty());
        // A [cluster] section with timings only is still a single node.
        let c = load_str("[cluster]\nheartbeat_ms = 40\n").unwrap();
        assert!(c.cluster.nodes.is_empty());
        assert_eq!(c.cluster.heartbeat_ms, 40);
        let err = load_str("[cluster]\nheartbeat_ms = 200\n").unwrap_err();
        assert!(err.to_string().contains("heartbeat_ms"), "{err}");
    }

    #[test]
    fn a_three_node_cluster_config_loads_and_copies_the_node_id() {
        let c = load_str(THREE).unwrap();
        assert_eq!(c.cluster.nodes.len(), 3);
        assert_eq!(c.cluster.node_id, 2);
        assert_eq!(c.cluster.listen, "127.0.0.1:22084");
    }

    #[test]
    fn cluster_mistakes_are_clear_errors() {
        let not_listed = THREE.replace("node_id = 2", "node_id = 7");
        let err = load_str(&not_listed).unwrap_err().to_string();
        assert!(err.contains("node_id 7 is not in `nodes`"), "{err}");

        let dup_id = THREE.replace("{ id = 3,", "{ id = 2,");
        let err = load_str(&dup_id).unwrap_err().to_string();
        assert!(err.contains("duplicate node id"), "{err}");

        let dup_addr = THREE.replace("127.0.0.1:21885", "127.0.0.1:21884");
        let err = load_str(&dup_addr).unwrap_err().to_string();
        assert!(err.contains("mqtt_addr 127.0.0.1:21884 is used by another node"), "{err}");

        let no_port = THREE.replace("\"127.0.0.1:21985\"", "\"localhost\"");
        let err = load_str(&no_port).unwrap_err().to_string();
        assert!(err.contains("admin_addr = \"localhost\" is not host:port"), "{err}");

        let err = load_str("[cluster]\njoin = true\n").unwrap_err().to_string();
        assert!(err.contains("join = true needs"), "{err}");
    }

    #[test]
    fn the_example_cluster_configs_load() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        for i in 1..=3u16 {
            let path = root.join(format!("config/cluster/node{i}.toml"));
            let c = Config::load(Some(&path), &Overrides::default()).unwrap();
            assert_eq!(c.node_id, u64::from(i));
            assert_eq!(c.cluster.nodes.len(), 3);
            assert_eq!(c.listeners[0].bind.port(), 21883 + i - 1);
            assert_eq!(c.admin.listen.port(), 21983 + i - 1);
            assert_eq!(c.cluster.listen, format!("127.0.0.1:{}", 22083 + i - 1));
        }
        let c = Config::load(Some(&root.join("config/raftmq.toml")), &Overrides::default()).unwrap();
        assert!(c.cluster.nodes.is_empty());
    }
}
