//! raftmq: a highly available MQTT 3.1.1 / 5.0 broker replicated with Raft.
//!
//! See docs/ARCHITECTURE.md for the layout and the path of a message.

pub mod admin;
pub mod auth;
pub mod broker;
pub mod listener;
pub mod protocol;
pub mod state;
pub mod topic;
