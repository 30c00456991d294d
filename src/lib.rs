//! raftmq: a highly available MQTT 3.1.1 / 5.0 broker replicated with Raft.
//!
//! See docs/ARCHITECTURE.md for the layout and the path of a message.

pub mod admin;
pub mod auth;
pub mod backup;
pub mod bench;
pub mod broker;
pub mod config;
pub mod ctl;
pub mod dynsec;
pub mod latency;
pub mod listener;
pub mod local_cluster;
pub mod modes;
pub mod node;
pub mod protocol;
pub mod raft;
pub mod state;
pub mod storage;
pub mod topic;
