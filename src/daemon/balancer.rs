//! The balancer of a `--balance` daemon: it enrolls in the group of daemons that run the same
//! elections on the same store, announces what this daemon may lead, and turns the group's
//! [`plan`] into what each election does: campaign, stand by, or hand over to a named successor.
//! It only chooses who campaigns; every move is an ordinary graceful hand-off of the elector.
//!
//! ```text
//!  Membership::changed ─┐
//!  election views ──────┼─► Snapshot ─► plan ─► stand_by / resign(successor)
//!  worker readiness ────┘                  └──► GroupView (status, metrics)
//! ```

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Duration,
};

use futures::future::select_all;
use tokio::{
    sync::watch,
    task::{JoinHandle, JoinSet},
    time::{Instant, sleep_until},
};
use tokio_util::sync::CancellationToken;

use crate::{
    backoff::Backoff,
    balance::{GroupView, Member, MemberView, Plan, Seat, Snapshot, Step, plan},
    config::Config,
    election::{CampaignMode, Election, Leadership, Role, Workers},
    metrics::BalanceMetrics,
    store::{Membership, Store, StoreError},
    timing::Timing,
};

/// The longest pause between attempts to reach the store's membership; a restarted member
/// whose old membership has not expired yet retries at least once a lease.
const RETRY_CAP: Duration = Duration::from_secs(30);

/// The running balancer.
pub(super) struct Balancer {
    /// What it shows.
    pub(super) view: watch::Receiver<GroupView>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Balancer {
    /// Start balancing `elections` in `group` (their [`crate::balance::group_name`]) over `store`.
    pub(super) fn start(
        store: Arc<dyn Store>,
        config: &Config,
        group: String,
        elections: Vec<Election>,
        metrics: BalanceMetrics,
    ) -> Balancer {
        let (view, view_rx) = watch::channel(GroupView {
            group: group.clone(),
            members: Vec::new(),
        });
        let stop = CancellationToken::new();
        let balancing = Balancing {
            identity: config.identity.clone(),
            group,
            timing: config.timing,
            campaign: config.campaign,
            metrics,
            seats: elections
                .into_iter()
                .map(|election| SeatState {
                    changes: election.changes(),
                    workers: election.workers(),
                    election,
                    standing_by: true,
                    handing_over: None,
                    last_holder: None,
                    vacant_since: None,
                    logged: false,
                    seen: Seen::default(),
                })
                .collect(),
            members: Vec::new(),
            view,
            hand_overs: JoinSet::new(),
        };
        let task = tokio::spawn(balancing.run(store, stop.clone()));
        Balancer {
            view: view_rx,
            stop,
            task,
        }
    }

    /// Leave the group at once, so the others take over this member's elections as it steps
    /// down; waits at most `bound`, then stops the balancer where it is (the membership then
    /// ends by expiry).
    pub(super) async fn leave(mut self, bound: Duration) {
        self.stop.cancel();
        if tokio::time::timeout(bound, &mut self.task).await.is_err() {
            tracing::warn!(?bound, "balance: leaving the group timed out");
            self.task.abort();
            let _ = (&mut self.task).await;
        }
    }
}

impl Balancer {
    /// Resolves if the balancer's task ends before [`Balancer::leave`]: it only does so by a
    /// panic, or when an election has ended. Cancel-safe; not to be awaited again once resolved.
    pub(super) async fn ended(&mut self) -> Result<(), tokio::task::JoinError> {
        (&mut self.task).await
    }
}

impl Drop for Balancer {
    /// The balancer never outlives its handle.
    fn drop(&mut self) {
        self.stop.cancel();
        self.task.abort();
    }
}

/// One election as the balancer follows it.
struct SeatState {
    election: Election,
    changes: watch::Receiver<Leadership>,
    workers: watch::Receiver<Workers>,
    /// What the balancer last told the election.
    standing_by: bool,
    /// The successor of a hand-over in progress.
    handing_over: Option<String>,
    /// The last holder seen, to tell a hand-over from a vacancy in the log.
    last_holder: Option<String>,
    /// Since when nobody holds it, as this member saw.
    vacant_since: Option<Instant>,
    /// This vacancy's campaign was logged (plans shift while seats fill: log it once).
    logged: bool,
    /// What the last plan read of the election; only a change of it wakes the balancer.
    seen: Seen,
}

/// What a plan reads of one election: a renewal (a new validity) changes none of it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Seen {
    known: bool,
    leader: Option<String>,
    term: u64,
    ready: bool,
}

impl Seen {
    fn of(changes: &watch::Receiver<Leadership>, workers: &watch::Receiver<Workers>) -> Seen {
        let state = changes.borrow();
        Seen {
            known: state.view.role != Role::Unknown,
            leader: state.view.leader.clone(),
            term: state.view.term,
            ready: workers.borrow().any_ready(),
        }
    }
}

impl SeatState {
    /// Resolves when what the plan reads of this election differs from what the last plan
    /// read; fails when the election has ended.
    async fn changed(&mut self) -> Result<(), watch::error::RecvError> {
        loop {
            if Seen::of(&self.changes, &self.workers) != self.seen {
                return Ok(());
            }
            tokio::select! {
                changed = self.changes.changed() => changed?,
                changed = self.workers.changed() => changed?,
            }
        }
    }
}

/// What this member leads and should lead, for the log.
#[derive(Debug, Clone, Copy)]
struct Tally {
    leads: usize,
    share: usize,
}

/// One line when this member starts campaigning for an election it does not hold, once per
/// vacancy. A seat handed over to this member was logged by the member that gave it.
fn log_campaign(seat: &mut SeatState, step: &Step, members: &[Member], tally: Tally) {
    let reason = match (&seat.last_holder, step) {
        (_, Step::StandBy) => "vacant for a lease; its planned leader did not take it",
        (Some(last), _) if !members.iter().any(|m| &m.identity == last) => {
            "its leader left the group"
        }
        // Never held. A seat held before whose holder this member never saw (it just started)
        // is most likely being handed to it, which the giver logs.
        (None, _) if seat.seen.term == 0 => "vacant",
        _ => return,
    };
    if !seat.logged {
        seat.logged = true;
        tracing::info!(
            election = %seat.election.name(), leads = tally.leads, share = tally.share, reason,
            "balance: campaigning"
        );
    }
}

/// What wakes the balancer.
enum Wake {
    Stop,
    Members(Result<Vec<Member>, StoreError>),
    Local,
    Vacancy,
    Retry,
    /// An election's task has ended: the daemon is stopping.
    Ended,
}

struct Balancing {
    identity: String,
    group: String,
    timing: Timing,
    campaign: CampaignMode,
    seats: Vec<SeatState>,
    /// The live members, as last read from the store.
    members: Vec<Member>,
    view: watch::Sender<GroupView>,
    metrics: BalanceMetrics,
    /// Resigns to a successor in progress; aborted if the balancer stops.
    hand_overs: JoinSet<()>,
}

impl Balancing {
    async fn run(mut self, store: Arc<dyn Store>, stop: CancellationToken) {
        let Some(mut membership) = self.enroll(&store, &stop).await else {
            return;
        };
        tracing::info!(group = %self.group, identity = %self.identity, "balance: joined the group");
        let mut announced: Option<BTreeSet<String>> = None;
        let mut backoff = Backoff::new(
            self.timing.retry_period,
            RETRY_CAP.min(self.timing.lease_duration),
        );
        let mut retry_at: Option<Instant> = None;
        loop {
            let eligible = self.eligible();
            let step = async {
                // After a store error, the next attempt waits out its back-off.
                if retry_at.is_none() && announced.as_ref() != Some(&eligible) {
                    match membership.announce(&eligible).await {
                        Ok(()) => announced = Some(eligible.clone()),
                        Err(error) => {
                            tracing::warn!(%error, "balance: cannot announce this member; retrying");
                            retry_at = Some(Instant::now() + backoff.next_delay());
                        }
                    }
                }
                self.apply(&eligible).await;
            };
            tokio::select! {
                _ = stop.cancelled() => break,
                () = step => {}
            }
            match self.wait(membership.as_mut(), &stop, retry_at).await {
                Wake::Stop => break,
                Wake::Members(Ok(members)) => {
                    backoff.reset();
                    retry_at = None;
                    self.log_membership(&members);
                    self.members = members;
                }
                Wake::Members(Err(error)) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(%error, ?delay, "balance: cannot read the group; retrying");
                    retry_at = Some(Instant::now() + delay);
                }
                Wake::Retry => retry_at = None,
                Wake::Local | Wake::Vacancy => {}
                Wake::Ended => {
                    // The daemon stops on it: leave with it, so that only a panic ends this
                    // task before the stop.
                    stop.cancelled().await;
                    break;
                }
            }
        }
        match membership.leave().await {
            Ok(()) => tracing::info!(group = %self.group, "balance: left the group"),
            Err(error) => {
                tracing::warn!(%error, "balance: could not leave the group; it ends by expiry")
            }
        }
    }

    /// Enroll, retrying with back-off while the store is down or refuses.
    async fn enroll(
        &self,
        store: &Arc<dyn Store>,
        stop: &CancellationToken,
    ) -> Option<Box<dyn Membership>> {
        let mut backoff = Backoff::new(
            self.timing.retry_period,
            RETRY_CAP.min(self.timing.lease_duration),
        );
        loop {
            let attempt = store.enroll(&self.group, &self.identity, self.timing);
            let error = tokio::select! {
                _ = stop.cancelled() => return None,
                outcome = attempt => match outcome {
                    Ok(membership) => return Some(membership),
                    Err(error) => error,
                },
            };
            let delay = backoff.next_delay();
            tracing::warn!(%error, ?delay, group = %self.group, "balance: cannot join the group; retrying");
            tokio::select! {
                _ = stop.cancelled() => return None,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// The elections this member may lead: all, or with `--campaign when-ready` those with a
    /// ready worker.
    fn eligible(&self) -> BTreeSet<String> {
        self.seats
            .iter()
            .filter(|seat| {
                self.campaign == CampaignMode::Always || seat.workers.borrow().any_ready()
            })
            .map(|seat| seat.election.name().to_owned())
            .collect()
    }

    /// Wait for the next thing that can change the plan.
    async fn wait(
        &mut self,
        membership: &mut dyn Membership,
        stop: &CancellationToken,
        retry_at: Option<Instant>,
    ) -> Wake {
        let vacancy = self.next_vacancy_deadline();
        let local = select_all(self.seats.iter_mut().map(|seat| Box::pin(seat.changed())));
        tokio::select! {
            _ = stop.cancelled() => Wake::Stop,
            // After a store error, the next read waits out its back-off.
            members = membership.changed(&self.members), if retry_at.is_none() => {
                Wake::Members(members)
            }
            _ = sleep_until(retry_at.unwrap_or_else(Instant::now)), if retry_at.is_some() => {
                Wake::Retry
            }
            (changed, _, _) = local => match changed {
                Ok(()) => Wake::Local,
                Err(_) => Wake::Ended,
            },
            _ = sleep_until(vacancy.unwrap_or_else(Instant::now)), if vacancy.is_some() => {
                Wake::Vacancy
            }
        }
    }

    /// When a seat planned for another member will have been vacant for one lease duration.
    fn next_vacancy_deadline(&self) -> Option<Instant> {
        self.seats
            .iter()
            .filter(|seat| seat.standing_by)
            .filter_map(|seat| seat.vacant_since)
            .map(|since| since + self.timing.lease_duration)
            .filter(|deadline| *deadline > Instant::now())
            .min()
    }

    /// Plan from what this member sees, and tell each election what to do.
    async fn apply(&mut self, local: &BTreeSet<String>) {
        let now = Instant::now();
        let snapshot = self.observe(now);
        let plan = plan(&snapshot);
        self.publish(&snapshot, &plan);
        let me = self.members.iter().find(|m| m.identity == self.identity);
        let tally = Tally {
            leads: snapshot
                .seats
                .iter()
                .filter(|s| s.holder.as_deref() == Some(&self.identity))
                .count(),
            share: plan
                .shares()
                .get(self.identity.as_str())
                .copied()
                .unwrap_or(0),
        };
        for (seat, seen) in self.seats.iter_mut().zip(&snapshot.seats) {
            let step = match me {
                // Not a member (yet, or no more, as the store shows), or the election's holder
                // was not known when the snapshot was taken: campaign nowhere. Asked of the
                // snapshot, not the election now: a seat that became known since is vacant in
                // the plan, and would be campaigned for as such.
                Some(_) if seat.seen.known => plan.step(&self.identity, seen),
                _ if seen.holder.as_deref() == Some(&self.identity) => Step::Lead,
                _ => Step::StandBy,
            };
            // What this member knows of itself, not what the group shows: a member the group does
            // not show (its record unreadable, say) still fills a vacancy nobody else fills.
            let eligible = local.contains(&seen.election);
            let stale_vacancy = seat
                .vacant_since
                .is_some_and(|since| now >= since + self.timing.lease_duration);
            let stand_by = match &step {
                Step::Lead => false,
                // The planned owner did not take a vacant seat within one lease (it may have
                // died and not yet dropped out): anyone eligible campaigns, so it is not left
                // without a leader.
                Step::StandBy => !(eligible && stale_vacancy),
                Step::HandOver(_) => true,
            };
            if !stand_by && seat.standing_by && seen.holder.as_deref() != Some(&self.identity) {
                log_campaign(seat, &step, &self.members, tally);
            }
            if stand_by != seat.standing_by {
                if seat.election.stand_by(stand_by).await.is_err() {
                    continue;
                }
                seat.standing_by = stand_by;
            }
            if let Step::HandOver(to) = step
                && seat.handing_over.as_deref() != Some(&to)
            {
                let reason = if eligible {
                    "this member leads more than its share"
                } else {
                    "no worker is ready for it here"
                };
                tracing::info!(
                    election = %seen.election, to = %to, leads = tally.leads, share = tally.share,
                    reason, "balance: handing over"
                );
                seat.handing_over = Some(to.clone());
                let election = seat.election.clone();
                // The hand-off announces, drains the workers and releases to `to`; the view
                // then shows the new holder, and the next plan follows.
                self.hand_overs.spawn(async move {
                    if let Err(error) = election.resign(Some(to)).await {
                        tracing::debug!(%error, "balance: hand-over not started");
                    }
                });
            }
            if seen.holder.is_some() {
                seat.last_holder = seen.holder.clone();
            }
        }
        // Finished hand-overs: their outcome was logged.
        while self.hand_overs.try_join_next().is_some() {}
    }

    /// Read each election's holder as this member sees it, noting vacancies.
    fn observe(&mut self, now: Instant) -> Snapshot {
        for seat in &mut self.seats {
            seat.changes.borrow_and_update();
            seat.workers.borrow_and_update();
            // One reading per round: everything below and the plan decide on `seen`, never on the
            // election as it is a moment later.
            seat.seen = Seen::of(&seat.changes, &seat.workers);
            let holder = &seat.seen.leader;
            match holder {
                None => {
                    seat.vacant_since.get_or_insert(now);
                }
                Some(_) => {
                    seat.vacant_since = None;
                    seat.logged = false;
                }
            }
            if holder.as_deref() != Some(&self.identity) {
                seat.handing_over = None;
            }
        }
        Snapshot {
            members: self.members.clone(),
            seats: self
                .seats
                .iter()
                .map(|seat| Seat {
                    election: seat.election.name().to_owned(),
                    holder: seat.seen.leader.clone(),
                })
                .collect(),
        }
    }

    /// Publish the group's view.
    fn publish(&self, snapshot: &Snapshot, plan: &Plan) {
        let shares = plan.shares();
        let members = self
            .members
            .iter()
            .map(|m| MemberView {
                identity: m.identity.clone(),
                eligible: m.eligible.len(),
                leads: snapshot
                    .seats
                    .iter()
                    .filter(|s| s.holder.as_deref() == Some(&m.identity))
                    .count(),
                share: shares.get(m.identity.as_str()).copied().unwrap_or(0),
            })
            .collect::<Vec<MemberView>>();
        let led = snapshot
            .seats
            .iter()
            .filter(|s| s.holder.as_deref() == Some(&self.identity))
            .count();
        let share = shares.get(self.identity.as_str()).copied().unwrap_or(0);
        self.metrics.seen(members.len(), led, share);
        self.view.send_if_modified(|view| {
            let changed = view.members != members;
            view.members = members;
            changed
        });
    }

    /// One line per change of membership.
    fn log_membership(&self, members: &[Member]) {
        let names = |list: &[Member]| -> BTreeMap<String, usize> {
            list.iter()
                .map(|m| (m.identity.clone(), m.eligible.len()))
                .collect()
        };
        let (before, after) = (names(&self.members), names(members));
        let joined: Vec<&String> = after.keys().filter(|m| !before.contains_key(*m)).collect();
        let left: Vec<&String> = before.keys().filter(|m| !after.contains_key(*m)).collect();
        if !joined.is_empty() || !left.is_empty() {
            tracing::info!(
                group = %self.group,
                members = after.len(),
                ?joined,
                ?left,
                "balance: the group changed"
            );
        }
    }
}

#[cfg(test)]
mod tests;
