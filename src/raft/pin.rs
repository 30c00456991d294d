//! The pinned leader ("configurable leader election", DESIGN.md "Leadership"),
//! and the per-member replication progress the admin API shows.
//!
//! The preference lives in the replicated State (`ClusterSettings.pinned_leader`,
//! set by the `PinLeader` command through the log), so every node agrees on
//! it and it survives restarts and snapshots. A task on every node acts only
//! while that node is the leader: every [`PIN_CHECK_INTERVAL`], if a pin is set
//! and the pinned node is a voter, healthy (its matched log index is within
//! [`PIN_MAX_LAG`] entries of the leader's last log index and it acknowledged
//! the leader within [`PIN_MAX_SILENCE`]) and not the leader already, it asks
//! openraft to transfer leadership to it. So leadership moves to the pinned
//! node, and when that node fails another node leads until it is back and
//! caught up, then leadership returns to it. Unpinning stops the task acting.
//!
//! Must not touch: the state machine's contents other than reading the
//! settings; proposing is done by the caller (admin API) through
//! [`RaftNode::pin_leader`].

use std::sync::Arc;
use std::time::Duration;

use openraft::async_runtime::watch::WatchReceiver;
use openraft::Instant as _;
use parking_lot::RwLock;
use tokio::sync::watch;

use super::{NodeAddr, NodeId, NodeMetrics, RaftError, RaftNode, Role};
use crate::state::{pb, State};

/// How often the leader checks whether leadership should move to the pinned node.
pub const PIN_CHECK_INTERVAL: Duration = Duration::from_millis(500);
/// The pinned node counts as caught up within this many entries of the leader's log.
pub const PIN_MAX_LAG: u64 = 100;
/// The pinned node counts as alive if it acknowledged the leader this recently.
pub const PIN_MAX_SILENCE: Duration = Duration::from_secs(1);
/// After asking for a transfer, wait this long before asking again (an
/// election takes a few hundred ms); it doubles with each attempt that leaves
/// this node leader, up to [`TRANSFER_COOLDOWN_MAX`], so a pinned node that
/// cannot win does not cause an election every few seconds.
pub const TRANSFER_COOLDOWN: Duration = Duration::from_secs(2);
pub const TRANSFER_COOLDOWN_MAX: Duration = Duration::from_secs(32);

/// The wait after `attempts` (>= 1) transfers that left this node leader.
pub fn cooldown(attempts: u32) -> Duration {
    TRANSFER_COOLDOWN.saturating_mul(1 << attempts.saturating_sub(1).min(5)).min(TRANSFER_COOLDOWN_MAX)
}

/// One member of the current membership, as this node knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberProgress {
    pub id: NodeId,
    pub addr: NodeAddr,
    /// Voter (else a non-voting learner).
    pub voter: bool,
    /// Leader only: the last log index known to be replicated to this member
    /// (the leader itself: its last log index).
    pub matched: Option<u64>,
    /// Leader only: how long ago the member last acknowledged the leader
    /// (the leader itself: zero).
    pub last_ack: Option<Duration>,
}

impl RaftNode {
    /// The shared State this node applies into (read it briefly: apply waits).
    pub fn state(&self) -> &Arc<RwLock<State>> {
        &self.state
    }

    /// The pinned leader recorded in the log, if any (as applied on this node).
    pub fn pinned_leader(&self) -> Option<NodeId> {
        self.state.read().cluster_settings().pinned_leader
    }

    /// The members of the current (possibly uncommitted) membership with
    /// their addresses; on the leader also their replication progress.
    pub fn members(&self) -> Vec<MemberProgress> {
        let m = self.raft.metrics();
        let m = m.borrow_watched();
        let membership = m.membership_config.membership();
        let voters: std::collections::BTreeSet<NodeId> = membership.voter_ids().collect();
        let is_leader = m.current_leader == Some(self.id) && m.state == openraft::ServerState::Leader;
        membership
            .nodes()
            .map(|(id, addr)| {
                let (matched, last_ack) = if *id == self.id && is_leader {
                    (m.last_log_index, Some(Duration::ZERO))
                } else {
                    let matched =
                        m.replication.as_ref().and_then(|r| r.get(id).cloned().flatten()).map(|l| l.index);
                    let ack =
                        m.heartbeat.as_ref().and_then(|h| h.get(id).cloned().flatten()).map(|t| t.elapsed());
                    (matched, ack)
                };
                MemberProgress { id: *id, addr: addr.clone(), voter: voters.contains(id), matched, last_ack }
            })
            .collect()
    }

    /// Records (`Some`) or clears (`None`) the pinned leader through the log;
    /// resolves once committed and applied here. Must run on the leader
    /// ([`RaftError::ForwardToLeader`] otherwise).
    pub async fn pin_leader(&self, node_id: Option<NodeId>) -> Result<(), RaftError> {
        let cmd = pb::Command { cmd: Some(pb::command::Cmd::PinLeader(pb::PinLeader { node_id })) };
        self.apply_command(cmd).await.map(drop)
    }
}

impl RaftNode {
    /// Removes a member: a voter leaves the voters (the leader itself steps
    /// down once that is committed), then the node leaves the membership.
    pub async fn remove_node(&self, id: NodeId) -> Result<(), RaftError> {
        use openraft::ChangeMembers;
        let one: std::collections::BTreeSet<NodeId> = [id].into();
        if self.metrics().voters.contains(&id) {
            self.raft
                .change_membership(ChangeMembers::RemoveVoters(one.clone()), false)
                .await
                .map_err(super::write_error)?;
        }
        if self.members().iter().any(|p| p.id == id) {
            self.raft
                .change_membership(ChangeMembers::RemoveNodes(one), false)
                .await
                .map_err(super::write_error)?;
        }
        Ok(())
    }
}

/// Whether `id` can take over leadership from the leader described by `m`
/// now: a voter, caught up within [`PIN_MAX_LAG`] entries and heard from
/// within [`PIN_MAX_SILENCE`]. A transfer to a node that cannot take over
/// would cost an election (the leader stops writing while it transfers).
pub fn ready_to_lead(m: &NodeMetrics, members: &[MemberProgress], id: NodeId) -> Result<(), String> {
    let Some(target) = members.iter().find(|p| p.id == id) else {
        return Err(format!("node {id} is not a member"));
    };
    if !target.voter {
        return Err(format!("node {id} is a learner; only a voter can lead"));
    }
    let last = m.last_log_index.unwrap_or(0);
    if target.matched.is_none_or(|i| i.saturating_add(PIN_MAX_LAG) < last) {
        return Err(format!("node {id} has not caught up with the leader's log"));
    }
    if target.last_ack.is_none_or(|d| d > PIN_MAX_SILENCE) {
        return Err(format!("node {id} has not answered the leader within {PIN_MAX_SILENCE:?}"));
    }
    Ok(())
}

/// Whether the leader described by `m` should hand leadership to `pinned` now.
pub fn should_transfer(
    m: &NodeMetrics,
    pinned: Option<NodeId>,
    members: &[MemberProgress],
) -> Option<NodeId> {
    let pinned = pinned?;
    if m.role != Role::Leader || pinned == m.node_id || m.leader != Some(m.node_id) {
        return None;
    }
    ready_to_lead(m, members, pinned).is_ok().then_some(pinned)
}

/// Runs the pin check until `stop` turns true (or the node shuts down).
pub(super) fn spawn(node: RaftNode, mut stop: watch::Receiver<bool>) {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(PIN_CHECK_INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_attempt: Option<tokio::time::Instant> = None;
        let mut attempts: u32 = 0;
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                r = stop.changed() => if r.is_err() || *stop.borrow() { return },
            }
            let m = node.metrics();
            if m.role == Role::Shutdown {
                return;
            }
            if m.role != Role::Leader {
                // Leadership moved (or was lost): a new term of leading starts afresh.
                attempts = 0;
                last_attempt = None;
                continue;
            }
            if last_attempt.is_some_and(|t| t.elapsed() < cooldown(attempts)) {
                continue;
            }
            let Some(to) = should_transfer(&m, node.pinned_leader(), &node.members()) else {
                continue;
            };
            tracing::info!(
                node = node.id,
                to,
                attempts,
                "leadership is pinned to node {to}, which is healthy: transferring"
            );
            last_attempt = Some(tokio::time::Instant::now());
            attempts = attempts.saturating_add(1);
            if let Err(e) = node.transfer_leader(to).await {
                tracing::warn!(error = %e, "leader transfer to the pinned node failed");
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics(role: Role, id: NodeId, last: u64) -> NodeMetrics {
        NodeMetrics {
            node_id: id,
            role,
            term: 2,
            leader: (role == Role::Leader).then_some(id),
            leader_addr: None,
            last_log_index: Some(last),
            commit_index: Some(last),
            applied_index: Some(last),
            snapshot_index: None,
            purged_index: None,
            quorum_acked_at: None,
            serving: role == Role::Leader,
            leader_changes: 1,
            voters: [1, 2, 3].into(),
            learners: Default::default(),
        }
    }

    fn member(id: NodeId, voter: bool, matched: Option<u64>, ack_ms: Option<u64>) -> MemberProgress {
        MemberProgress {
            id,
            addr: NodeAddr {
                cluster_addr: String::new(),
                mqtt_addr: String::new(),
                admin_addr: String::new(),
            },
            voter,
            matched,
            last_ack: ack_ms.map(Duration::from_millis),
        }
    }

    #[test]
    fn cooldown_doubles_up_to_the_maximum() {
        let secs: Vec<u64> = (1..=8).map(|a| cooldown(a).as_secs()).collect();
        assert_eq!(secs, vec![2, 4, 8, 16, 32, 32, 32, 32]);
        assert_eq!(cooldown(0), TRANSFER_COOLDOWN);
    }

    #[test]
    fn transfers_only_to_a_healthy_caught_up_voter_from_the_leader() {
        let leader = metrics(Role::Leader, 1, 1000);
        let healthy = [member(1, true, Some(1000), Some(0)), member(3, true, Some(990), Some(50))];
        assert_eq!(should_transfer(&leader, Some(3), &healthy), Some(3));
        // No pin, pinned to itself, or not the leader: nothing to do.
        assert_eq!(should_transfer(&leader, None, &healthy), None);
        assert_eq!(should_transfer(&leader, Some(1), &healthy), None);
        assert_eq!(should_transfer(&metrics(Role::Follower, 1, 1000), Some(3), &healthy), None);
        // Lagging, silent, unknown, or a learner: wait.
        let lagging = [member(3, true, Some(1000 - PIN_MAX_LAG - 1), Some(10))];
        assert_eq!(should_transfer(&leader, Some(3), &lagging), None);
        let silent = [member(3, true, Some(1000), Some(PIN_MAX_SILENCE.as_millis() as u64 + 1))];
        assert_eq!(should_transfer(&leader, Some(3), &silent), None);
        let unknown = [member(3, true, None, None)];
        assert_eq!(should_transfer(&leader, Some(3), &unknown), None);
        let learner = [member(3, false, Some(1000), Some(10))];
        assert_eq!(should_transfer(&leader, Some(3), &learner), None);
        assert_eq!(should_transfer(&leader, Some(4), &healthy), None);
        assert!(ready_to_lead(&leader, &healthy, 3).is_ok());
        assert!(ready_to_lead(&leader, &lagging, 3).unwrap_err().contains("caught up"));
        assert!(ready_to_lead(&leader, &silent, 3).unwrap_err().contains("answered"));
        assert!(ready_to_lead(&leader, &learner, 3).unwrap_err().contains("learner"));
        assert!(ready_to_lead(&leader, &healthy, 4).unwrap_err().contains("not a member"));
    }
}
