//! Which replica should lead which lane (docs/design.md#spread).
//!
//! Every replica computes the same assignment from the same inputs: the lanes, and the
//! live replicas that may lead, read from the registry in PostgreSQL. Each lane prefers
//! the replicas in the order of a rendezvous hash of (lane, replica id), so the
//! assignment is stable (a replica joining or leaving moves only a few lanes), and no
//! replica takes more than ceil(lanes / replicas): pairs are taken best score first, and
//! a replica that has its share takes no more.
//!
//! The assignment only steers; it never decides safety, which stays with the lease and
//! the fence. A follower campaigns at once for the lanes assigned to it and leaves the
//! others to their assignee unless they stay free for a retry interval; a leader hands a
//! lane over once the live set has been stable for two retry intervals and the lane is
//! assigned to another live replica. A replica that restarts counts as a change of the
//! live set even when it comes back under the same id before its old heartbeat ages
//! out: the lanes it led went elsewhere meanwhile, and come back by a new rebalance. With a single lane nothing is steered: whoever
//! wins the lease keeps it, as before lanes.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::time::Instant;

use crate::store::{DEFAULT_LANE, ReplicaRecord};

/// This replica's view of the cluster, refreshed from the registry.
pub struct Spread {
    me: String,
    lanes: Vec<String>,
    /// How long the live set must stay unchanged before leaders hand lanes over.
    settle: Duration,
    view: Mutex<View>,
}

#[derive(Default)]
struct View {
    /// The replicas that may lead, sorted (this one included while it is eligible).
    live: Vec<String>,
    /// `live` with each one's start time (this replica's own: `None`), so that a
    /// replica restarting under the same id is a change too.
    members: BTreeMap<String, Option<DateTime<Utc>>>,
    /// A live replica of a release without lanes: its claim takes every lane's rows,
    /// so lanes other than `default` wait until it is gone.
    older_release_live: bool,
    /// When `live` last changed; `None` before the first reading.
    changed_at: Option<Instant>,
    /// Counts the changes of `live`: one rebalance each.
    generation: u64,
    assignment: HashMap<String, String>,
    /// The generation and epoch in which this replica last handed each lane over. A
    /// lane it leads again in the same generation, in the very next epoch, stays: its
    /// assignee did not take it (it cannot reach Redis, or its configuration differs),
    /// and handing it over again would only make it flap. A later epoch means someone
    /// else led the lane in between (the handover worked, then that leader died or
    /// stalled): the lane is handed over again.
    handed_over: HashMap<String, (u64, i64)>,
}

impl Spread {
    /// `retry_interval`: `LOCK_RETRY_INTERVAL`; the live set counts as stable after two.
    pub fn new(me: &str, lanes: &[String], retry_interval: Duration) -> Self {
        Self {
            me: me.to_string(),
            lanes: lanes.to_vec(),
            settle: retry_interval * 2,
            view: Mutex::new(View::default()),
        }
    }

    fn view(&self) -> std::sync::MutexGuard<'_, View> {
        self.view.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether leadership is steered at all: only with more than one lane.
    pub fn steers(&self) -> bool {
        self.lanes.len() > 1
    }

    /// Takes in the registry's live replicas (`me_eligible`: whether this replica
    /// campaigns, so counts even before its own heartbeat shows).
    pub fn observe(&self, replicas: &[ReplicaRecord], me_eligible: bool) {
        let mut members: BTreeMap<String, Option<DateTime<Utc>>> = replicas
            .iter()
            .filter(|r| r.leader_eligible && r.knows_lanes)
            .map(|r| {
                let started = (r.replica_id != self.me).then_some(r.started_at);
                (r.replica_id.clone(), started)
            })
            .collect();
        if me_eligible {
            members.insert(self.me.clone(), None);
        }
        let older_release_live = replicas.iter().any(|r| !r.knows_lanes);
        let mut view = self.view();
        view.older_release_live = older_release_live;
        if view.changed_at.is_none() || view.members != members {
            let live: Vec<String> = members.keys().cloned().collect();
            view.assignment = assign(&self.lanes, &live);
            view.live = live;
            view.members = members;
            view.changed_at = Some(Instant::now());
            view.generation += 1;
        }
    }

    /// Whether this replica may lead `lane` at all now.
    pub fn may_lead(&self, lane: &str) -> bool {
        lane == DEFAULT_LANE || !self.view().older_release_live
    }

    /// Whether a follower should campaign for `lane` at once: it is assigned to this
    /// replica, counting `leaving` (a replica that just announced it let the lane go)
    /// as gone. Always true when nothing is steered or nothing is known yet.
    pub fn prefers_me(&self, lane: &str, leaving: Option<&str>) -> bool {
        if !self.steers() {
            return true;
        }
        let view = self.view();
        if view.changed_at.is_none() {
            return true;
        }
        let assignee = match leaving {
            Some(leaving) if view.live.iter().any(|r| r == leaving) => {
                let live: Vec<String> = view
                    .live
                    .iter()
                    .filter(|r| *r != leaving)
                    .cloned()
                    .collect();
                assign(&self.lanes, &live).remove(lane)
            }
            _ => view.assignment.get(lane).cloned(),
        };
        assignee.is_none_or(|assignee| assignee == self.me)
    }

    /// Whether the leader of `lane` (this replica, in term `epoch`) should hand it over:
    /// the live set has been stable for two retry intervals and assigns the lane to
    /// another replica.
    pub fn should_hand_over(&self, lane: &str, epoch: i64) -> bool {
        if !self.steers() {
            return false;
        }
        let view = self.view();
        let stable = view
            .changed_at
            .is_some_and(|at| at.elapsed() >= self.settle);
        stable
            && view.handed_over.get(lane) != Some(&(view.generation, epoch - 1))
            && view
                .assignment
                .get(lane)
                .is_some_and(|assignee| *assignee != self.me)
    }

    /// Records that this replica handed `lane` over, in this generation, at the end of
    /// term `epoch`: if nobody else takes it, it is not handed over again until the
    /// next rebalance.
    pub fn handed_over(&self, lane: &str, epoch: i64) {
        let mut view = self.view();
        let generation = view.generation;
        view.handed_over
            .insert(lane.to_string(), (generation, epoch));
    }

    /// The replica `lane` is assigned to, if known (status pages).
    pub fn assignee(&self, lane: &str) -> Option<String> {
        self.view().assignment.get(lane).cloned()
    }
}

/// Assigns each lane to one of `replicas`: pairs in descending rendezvous score, each
/// lane to the first replica that still has room. Two passes: first every replica
/// takes up to floor(lanes / replicas), then the lanes left over go, at most one more
/// each, so every replica leads floor or ceil of lanes / replicas: a replica that joins
/// takes its share, no more and no less. The same inputs give the same answer on every
/// replica (the hash is fixed, not the standard library's per-process one).
pub fn assign(lanes: &[String], replicas: &[String]) -> HashMap<String, String> {
    let mut assignment = HashMap::new();
    if replicas.is_empty() {
        return assignment;
    }
    let mut pairs: Vec<(u64, &str, &str)> = lanes
        .iter()
        .flat_map(|lane| {
            replicas
                .iter()
                .map(move |replica| (score(lane, replica), lane.as_str(), replica.as_str()))
        })
        .collect();
    // Ties (practically never) are broken by the names, so the order is total.
    pairs.sort_by(|a, b| b.cmp(a));
    let mut load: HashMap<&str, usize> = HashMap::new();
    let floor = lanes.len() / replicas.len();
    for share in [floor, floor + 1] {
        for &(_, lane, replica) in &pairs {
            if assignment.contains_key(lane) {
                continue;
            }
            let taken = load.entry(replica).or_default();
            if *taken < share {
                *taken += 1;
                assignment.insert(lane.to_string(), replica.to_string());
            }
        }
    }
    assignment
}

/// The rendezvous score of a (lane, replica) pair: FNV-1a over both names, then the
/// splitmix64 finaliser so that names differing in one character spread well.
fn score(lane: &str, replica: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in lane.bytes().chain([0xff]).chain(replica.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash = (hash ^ (hash >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash = (hash ^ (hash >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^ (hash >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(prefix: &str, n: usize) -> Vec<String> {
        (0..n).map(|i| format!("{prefix}{i}")).collect()
    }

    fn loads(assignment: &HashMap<String, String>) -> HashMap<String, usize> {
        let mut loads = HashMap::new();
        for replica in assignment.values() {
            *loads.entry(replica.clone()).or_default() += 1;
        }
        loads
    }

    #[test]
    fn no_replica_takes_more_than_its_share_and_every_lane_has_one() {
        for (lanes, replicas) in [(5, 3), (4, 3), (6, 3), (1, 3), (7, 2), (3, 5), (64, 7)] {
            for seed in 0..20 {
                let lanes = names("lane-", lanes);
                let replicas = names(&format!("replica-{seed}-"), replicas);
                let assignment = assign(&lanes, &replicas);
                assert_eq!(assignment.len(), lanes.len());
                let (floor, ceil) = (
                    lanes.len() / replicas.len(),
                    lanes.len().div_ceil(replicas.len()),
                );
                let loads = loads(&assignment);
                for replica in &replicas {
                    let n = loads.get(replica).copied().unwrap_or(0);
                    assert!((floor..=ceil).contains(&n), "{replica}: {n} of {loads:?}");
                }
            }
        }
    }

    #[test]
    fn the_assignment_depends_only_on_the_names() {
        let lanes = names("l", 6);
        let mut replicas = names("r", 3);
        let first = assign(&lanes, &replicas);
        replicas.reverse();
        assert_eq!(assign(&lanes, &replicas), first);
        assert_eq!(
            score("otp", "replica-a"),
            score("otp", "replica-a"),
            "a fixed hash"
        );
    }

    #[test]
    fn a_replica_joining_takes_its_share_and_few_lanes_move() {
        let lanes = names("lane-", 6);
        for seed in 0..20 {
            let mut replicas = names(&format!("r{seed}-"), 2);
            let before = assign(&lanes, &replicas);
            replicas.push(format!("joiner-{seed}"));
            let after = assign(&lanes, &replicas);
            let joined = after.values().filter(|r| r.starts_with("joiner")).count();
            assert_eq!(joined, 2, "the new replica takes its share of 6 / 3");
            let moved = lanes.iter().filter(|l| before[*l] != after[*l]).count();
            assert!(moved <= 4, "seed {seed}: {moved} lanes moved");
        }
    }

    fn replica(id: &str, knows_lanes: bool) -> ReplicaRecord {
        ReplicaRecord {
            replica_id: id.to_string(),
            version: "test".into(),
            started_at: DateTime::UNIX_EPOCH,
            last_seen_at: chrono::Utc::now(),
            knows_lanes,
            leader_eligible: true,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_leader_hands_over_only_once_the_live_set_has_settled() {
        let lanes = names("lane-", 4);
        let spread = Spread::new("a", &lanes, Duration::from_secs(2));
        spread.observe(&[replica("a", true), replica("b", true)], true);
        let theirs = lanes
            .iter()
            .find(|l| spread.assignee(l).as_deref() == Some("b"))
            .unwrap();
        assert!(!spread.should_hand_over(theirs, 1), "not settled yet");
        assert!(!spread.prefers_me(theirs, None));
        assert!(spread.prefers_me(theirs, Some("b")), "b let it go");
        tokio::time::advance(Duration::from_secs(4)).await;
        assert!(spread.should_hand_over(theirs, 1));
        spread.handed_over(theirs, 1);
        assert!(
            !spread.should_hand_over(theirs, 2),
            "led again in the next term (its assignee did not take it): it stays"
        );
        spread.observe(&[replica("a", true), replica("c", true)], true);
        tokio::time::advance(Duration::from_secs(4)).await;
        spread.observe(&[replica("a", true), replica("b", true)], true);
        tokio::time::advance(Duration::from_secs(4)).await;
        assert!(
            spread.should_hand_over(theirs, 2),
            "a new rebalance may move it again"
        );
        let ours = lanes
            .iter()
            .find(|l| spread.assignee(l).as_deref() == Some("a"))
            .unwrap();
        assert!(!spread.should_hand_over(ours, 1));
    }

    /// Replica a's spread of four lanes over a and b, settled; and a lane assigned to b.
    async fn settled_with_a_lane_of_b() -> (Spread, String) {
        let lanes = names("lane-", 4);
        let spread = Spread::new("a", &lanes, Duration::from_secs(2));
        spread.observe(&[replica("a", true), replica("b", true)], true);
        tokio::time::advance(Duration::from_secs(4)).await;
        let theirs = lanes
            .into_iter()
            .find(|l| spread.assignee(l).as_deref() == Some("b"))
            .unwrap();
        (spread, theirs)
    }

    /// The handover worked (b led the lane in term 2), then b died or stalled and this
    /// replica took the lane back in term 3: b, back, gets it again.
    #[tokio::test(start_paused = true)]
    async fn a_lane_taken_back_from_its_assignee_is_handed_over_again() {
        let (spread, theirs) = settled_with_a_lane_of_b().await;
        let theirs = theirs.as_str();
        assert!(spread.should_hand_over(theirs, 1));
        spread.handed_over(theirs, 1);
        assert!(
            spread.should_hand_over(theirs, 3),
            "someone else led it in between: the lane goes back to its assignee"
        );
    }

    /// b restarts under the same id before its old heartbeat ages out: the live set
    /// reads the same names, but it is a new rebalance.
    #[tokio::test(start_paused = true)]
    async fn a_replica_restarting_under_the_same_id_is_a_new_rebalance() {
        let (spread, theirs) = settled_with_a_lane_of_b().await;
        let theirs = theirs.as_str();
        spread.handed_over(theirs, 1);
        assert!(!spread.should_hand_over(theirs, 2));
        let mut restarted = replica("b", true);
        restarted.started_at = DateTime::UNIX_EPOCH + chrono::TimeDelta::seconds(60);
        spread.observe(&[replica("a", true), restarted.clone()], true);
        assert!(
            !spread.should_hand_over(theirs, 2),
            "the restarted replica settles first"
        );
        tokio::time::advance(Duration::from_secs(4)).await;
        spread.observe(&[replica("a", true), restarted], true);
        assert!(spread.should_hand_over(theirs, 2));
    }

    #[test]
    fn lanes_wait_while_a_replica_of_an_older_release_is_live() {
        let lanes = names("lane-", 2);
        let spread = Spread::new("a", &lanes, Duration::from_secs(2));
        spread.observe(&[replica("a", true), replica("old", false)], true);
        assert!(spread.may_lead(DEFAULT_LANE));
        assert!(!spread.may_lead("lane-1"));
        spread.observe(&[replica("a", true)], true);
        assert!(spread.may_lead("lane-1"));
    }

    #[test]
    fn one_lane_is_never_steered() {
        let spread = Spread::new("a", &[DEFAULT_LANE.to_string()], Duration::from_secs(2));
        spread.observe(&[replica("a", true), replica("b", true)], true);
        assert!(spread.prefers_me(DEFAULT_LANE, None));
        assert!(!spread.should_hand_over(DEFAULT_LANE, 1));
    }
}
