//! Membership of a balancing group in the Kubernetes store: one Lease per member, labelled with
//! the group, renewed every retry period by a task the membership owns, and judged live by the
//! rule of the election Leases (its record changed within its `leaseDurationSeconds`, on this
//! process's monotonic clock). Members are found by a label-selector list and watch of Leases,
//! so a group needs no RBAC beyond Leases: no pods are listed.
//!
//! ```text
//! Lease <group>.<identity> (or <group>-<hash of identity>) in <namespace>
//!   metadata.labels            baton.dev/balance-group: <group>
//!   metadata.annotations       baton.dev/eligible: ["e1","e2"] (JSON; absent until announced)
//!   spec.holderIdentity        the member's --identity
//!   spec.leaseDurationSeconds  --lease-duration in whole seconds
//!   spec.acquireTime           when this process enrolled: marks its incarnation
//!   spec.renewTime             the last renewal (the writer's wall clock, for people only)
//! ```
//!
//! - **Joining** creates the member Lease. If one exists, it belongs to a live process only if
//!   it changes: the newcomer re-reads it every retry period and refuses to join
//!   ([`KubernetesError::MemberInUse`], naming `--identity`) when it changes, or takes it over
//!   (compare-and-swap) once it has not changed for its lease duration. A process that died
//!   and restarts with the same identity thus rejoins within one lease, as its elections do.
//! - **Reading** counts a member live until its record has not changed for its lease duration
//!   since this process saw it change. A newcomer cannot tell a dead member's last renewal from
//!   a live one's, so a member that died just before it looked counts for up to one lease.
//! - **Displaced**: a renewal that finds another process's record in its Lease (another
//!   holder or acquireTime) stops writing; each later renewal or announce only reads that
//!   record again and judges it by the rule above, refusing ([`KubernetesError::MemberInUse`])
//!   while it is live. Once it has not changed for its lease duration, or is gone, the member
//!   takes the Lease back (compare-and-swap, a fresh acquireTime, its announced elections) and
//!   renews again.
//! - **Leaving** stops the renewals and deletes the Lease (conditioned on the version last
//!   written), so others see it gone at once. A dropped membership stops renewing only: its
//!   Lease expires after one lease duration, as a dead process's does.

use std::{
    collections::{BTreeMap, BTreeSet},
    hash::Hasher as _,
    sync::Arc,
};

use futures::StreamExt as _;
use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
};
use kube::{
    Api,
    api::{DeleteParams, ListParams, PostParams, Preconditions, WatchParams},
};
use tokio::{
    sync::Mutex,
    task::JoinHandle,
    time::{Instant, sleep, sleep_until, timeout},
};

use super::config::valid_dns_name;
use super::error::{KubernetesError, is_not_found};
use super::lease_watch::{self, Event, OpenWatch, WATCH_SECONDS};
use super::record::{Seen, now_micro};
use crate::{
    balance::Member,
    store::{Membership, StoreError},
    timing::Timing,
};

/// The label naming a member Lease's group; members find each other by it.
pub const GROUP_LABEL: &str = "baton.dev/balance-group";
/// The annotation listing, as a JSON array, the elections a member may lead.
pub const ELIGIBLE_ANNOTATION: &str = "baton.dev/eligible";

/// How many times a renewal re-reads after a conflict that left the Lease ours.
const CAS_ATTEMPTS: usize = 3;

/// The member Lease of `identity` in `group`: `<group>.<identity>` when that is a valid object
/// name (a DNS-1123 subdomain of at most 253 characters), else `<group>-<16 hex digits>` of a
/// hash of the identity. The separator tells the two forms apart, so they never collide.
pub fn member_lease_name(group: &str, identity: &str) -> String {
    let readable = format!("{group}.{identity}");
    if readable.len() <= 253
        && identity
            .split('.')
            .all(|label| valid_dns_name(label, false))
    {
        return readable;
    }
    let mut hasher = fnv::FnvHasher::default();
    hasher.write(identity.as_bytes());
    format!("{group}-{:016x}", hasher.finish())
}

/// Where a member's Lease lives and who writes it: shared by the membership and its renewals.
#[derive(Clone)]
pub(super) struct MemberLease {
    pub(super) api: Api<Lease>,
    pub(super) namespace: String,
    pub(super) principal: String,
    pub(super) group: String,
    pub(super) identity: String,
    pub(super) name: String,
    pub(super) timing: Timing,
    pub(super) lease_seconds: i32,
}

/// This member's Lease as last written.
struct Own {
    /// Carries the resourceVersion of the last write (`None`: to be created).
    lease: Lease,
    /// Set when another process took the Lease over: its record as last seen. Renewals write
    /// nothing until that record may be taken over.
    displaced: Option<Seen>,
}

impl MemberLease {
    fn fail(&self, verb: &'static str, error: kube::Error) -> StoreError {
        KubernetesError::of_call(verb, &self.namespace, &self.name, &self.principal, error).into()
    }

    /// Bound a call by the renew deadline.
    async fn bounded<T>(
        &self,
        verb: &'static str,
        call: impl Future<Output = kube::Result<T>>,
    ) -> Result<T, StoreError> {
        let limit = self.timing.renew_deadline;
        match timeout(limit, call).await {
            Ok(result) => result.map_err(|e| self.fail(verb, e)),
            Err(_) => Err(StoreError::Timeout {
                op: verb,
                after: limit,
            }),
        }
    }

    fn selector(&self) -> String {
        format!("{GROUP_LABEL}={}", self.group)
    }

    /// The group's Leases, and the version to watch from.
    async fn list(&self) -> Result<kube::core::ObjectList<Lease>, StoreError> {
        let params = ListParams::default().labels(&self.selector());
        self.bounded("list", self.api.list(&params)).await
    }

    /// This member's Lease now, if it exists, labelled or not: a Lease of this name without the
    /// group's label still blocks a create. A list by name, not a get: a Role that grants the
    /// group's list need not grant get of every member Lease (deploy/overlays/balanced does not).
    async fn read(&self) -> Result<Option<Lease>, StoreError> {
        let params = ListParams::default().fields(&format!("metadata.name={}", self.name));
        let list = self.bounded("list", self.api.list(&params)).await?;
        let name = Some(self.name.as_str());
        Ok(list
            .items
            .into_iter()
            .find(|l| l.metadata.name.as_deref() == name))
    }

    /// A fresh record of this process (`acquire_time` marks it), with no version.
    fn record(&self, acquire_time: MicroTime) -> Lease {
        Lease {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                namespace: Some(self.namespace.clone()),
                labels: Some(BTreeMap::from([(
                    GROUP_LABEL.to_owned(),
                    self.group.clone(),
                )])),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(self.identity.clone()),
                lease_duration_seconds: Some(self.lease_seconds),
                acquire_time: Some(acquire_time.clone()),
                renew_time: Some(acquire_time),
                ..LeaseSpec::default()
            }),
        }
    }

    /// Create `lease`, or replace it when it carries the version it was read at.
    async fn write(&self, lease: &Lease) -> Result<Lease, StoreError> {
        let params = PostParams::default();
        if lease.metadata.resource_version.is_none() {
            self.bounded("create", self.api.create(&params, lease))
                .await
        } else {
            self.bounded("update", self.api.replace(&self.name, &params, lease))
                .await
        }
    }

    /// Create the member Lease or take over an expired one; see the module's rules.
    async fn join(&self) -> Result<Lease, StoreError> {
        let fresh = self.record(now_micro());
        let mut seen: Option<Seen> = None;
        // No write before this: a retry period after the last conflict, so that a Lease that
        // keeps refusing the write costs a request per period, not a burst.
        let mut not_before = Instant::now();
        loop {
            let now = Instant::now();
            // What to write: a create (no record), a take-over on the version seen (a free
            // record, or one unchanged for its lease duration), or nothing yet (it looks live:
            // look again after a retry period, or at its expiry).
            let write = match &seen {
                None => Some(None),
                Some(s) if self.may_take(s, now) => Some(s.lease.metadata.resource_version.clone()),
                Some(s) => {
                    let expiry = s.expiry(self.timing.lease_duration);
                    sleep(self.timing.retry_period.min(expiry - now)).await;
                    None
                }
            };
            if let Some(version) = write {
                sleep_until(not_before).await;
                let mut lease = fresh.clone();
                lease.metadata.resource_version = version;
                match self.write(&lease).await {
                    Ok(written) => return Ok(written),
                    Err(StoreError::Kubernetes(KubernetesError::Conflict { .. })) => {
                        not_before = Instant::now() + self.timing.retry_period;
                    }
                    Err(e) if is_not_found(&e) => {}
                    Err(e) => return Err(e),
                }
            }
            let Some(current) = self.read().await? else {
                seen = None;
                continue;
            };
            let next = Seen::observe(seen.as_ref(), current);
            let changed = seen
                .as_ref()
                .is_some_and(|s| s.changed_at != next.changed_at);
            if changed && next.record.holder().is_some() {
                return Err(self.in_use());
            }
            seen = Some(next);
        }
    }

    /// Whether a record seen as `seen` may be written over at `now`: it is free, or it has not
    /// changed for its lease duration.
    fn may_take(&self, seen: &Seen, now: Instant) -> bool {
        seen.record.holder().is_none() || now >= seen.expiry(self.timing.lease_duration)
    }

    /// Write our record again (with `eligible` announced, if given), a compare-and-swap on the
    /// version last written. After a conflict, re-read: a record of this process (same holder
    /// and acquireTime, edited by a third party) is written again; another's means another
    /// process took the Lease over, and this member is displaced until [`Self::reclaim`] may
    /// take it back. A deleted Lease is created again.
    async fn renew(
        &self,
        own: &mut Own,
        eligible: Option<&BTreeSet<String>>,
    ) -> Result<(), StoreError> {
        let reclaiming = own.displaced.is_some();
        if reclaiming {
            self.reclaim(own).await?;
        }
        for _ in 0..CAS_ATTEMPTS {
            let mut lease = own.lease.clone();
            lease.metadata.managed_fields = None;
            let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
            spec.holder_identity = Some(self.identity.clone());
            spec.lease_duration_seconds = Some(self.lease_seconds);
            spec.renew_time = Some(now_micro());
            if let Some(eligible) = eligible {
                let json = serde_json::to_string(eligible)
                    .expect("a set of strings always serializes as a JSON array");
                lease
                    .metadata
                    .annotations
                    .get_or_insert_with(BTreeMap::new)
                    .insert(ELIGIBLE_ANNOTATION.to_owned(), json);
            }
            match self.write(&lease).await {
                Ok(written) => {
                    own.lease = written;
                    if reclaiming {
                        tracing::info!(
                            lease = %self.name,
                            identity = %self.identity,
                            "balancing membership taken back: the other process's lease expired or is gone"
                        );
                    }
                    return Ok(());
                }
                Err(StoreError::Kubernetes(KubernetesError::Conflict { .. })) => {}
                Err(e) if is_not_found(&e) => {
                    own.lease.metadata.resource_version = None;
                    continue;
                }
                Err(e) => return Err(e),
            }
            match self.read().await? {
                Some(current) if self.is_ours(own, &current) => own.lease = current,
                Some(current) => {
                    tracing::warn!(
                        lease = %self.name,
                        identity = %self.identity,
                        "balancing membership taken over by another process; \
                         renewals pause until its lease expires"
                    );
                    own.displaced = Some(Seen::observe(None, current));
                    return Err(self.in_use());
                }
                None => own.lease.metadata.resource_version = None,
            }
        }
        Err(KubernetesError::Contended {
            namespace: self.namespace.clone(),
            lease: self.name.clone(),
        }
        .into())
    }

    /// While displaced: read the other process's record again and refuse ([`Self::in_use`])
    /// while it is live. Once it may be taken over (or is gone), make `own` a fresh record of
    /// this process, with its announced elections, to be written on the version just read.
    async fn reclaim(&self, own: &mut Own) -> Result<(), StoreError> {
        let version = match self.read().await? {
            None => None,
            Some(current) => {
                let seen = Seen::observe(own.displaced.as_ref(), current);
                if !self.may_take(&seen, Instant::now()) {
                    own.displaced = Some(seen);
                    return Err(self.in_use());
                }
                seen.lease.metadata.resource_version
            }
        };
        let mut fresh = self.record(now_micro());
        fresh.metadata.annotations = own.lease.metadata.annotations.take();
        fresh.metadata.resource_version = version;
        own.lease = fresh;
        own.displaced = None;
        Ok(())
    }

    /// Delete our Lease, conditioned on the version last written; after a conflict (a renewal
    /// cut off by the abort may have landed), re-read and delete again while the record is ours.
    async fn delete(&self, own: &mut Own) -> Result<(), StoreError> {
        for _ in 0..CAS_ATTEMPTS {
            let Some(version) = own.lease.metadata.resource_version.clone() else {
                return Ok(());
            };
            if own.displaced.is_some() {
                return Ok(());
            }
            let params = DeleteParams {
                preconditions: Some(Preconditions {
                    resource_version: Some(version),
                    uid: None,
                }),
                ..DeleteParams::default()
            };
            match self
                .bounded("delete", self.api.delete(&self.name, &params))
                .await
            {
                Ok(_) => return Ok(()),
                Err(StoreError::Kubernetes(KubernetesError::Conflict { .. })) => {}
                Err(e) if is_not_found(&e) => return Ok(()),
                Err(e) => return Err(e),
            }
            match self.read().await? {
                Some(current) if self.is_ours(own, &current) => own.lease = current,
                _ => return Ok(()),
            }
        }
        Ok(())
    }

    /// Whether `current` is the record of this process: our holder and acquireTime.
    fn is_ours(&self, own: &Own, current: &Lease) -> bool {
        let acquire_time = |l: &Lease| l.spec.as_ref().and_then(|s| s.acquire_time.clone());
        let holder = current
            .spec
            .as_ref()
            .and_then(|s| s.holder_identity.as_deref());
        holder == Some(self.identity.as_str()) && acquire_time(current) == acquire_time(&own.lease)
    }

    /// Another live process has this member's identity.
    fn in_use(&self) -> StoreError {
        KubernetesError::MemberInUse {
            group: self.group.clone(),
            identity: self.identity.clone(),
            namespace: self.namespace.clone(),
            lease: self.name.clone(),
        }
        .into()
    }

    /// Renew every retry period until aborted; while displaced, look at the other process's
    /// record instead, and take the Lease back once it expires. A failure is logged and the next
    /// period tries again: the Lease expires only if renewals fail for a whole lease.
    async fn keep_alive(self, own: Arc<Mutex<Own>>) {
        loop {
            sleep(self.timing.retry_period).await;
            let mut own = own.lock().await;
            if let Err(error) = self.renew(&mut own, None).await {
                tracing::debug!(%error, "member lease renewal failed");
            }
        }
    }
}

/// This daemon's place in a balancing group: its renewed Lease, and the group as last seen.
pub(super) struct LeaseMembership {
    lease: MemberLease,
    own: Arc<Mutex<Own>>,
    /// Renews the Lease (or waits to take it back); aborted on leave and on drop.
    renewer: JoinHandle<()>,
    /// The group's Leases by name, each with when this process first saw it as it is.
    members: BTreeMap<String, Seen>,
    resume_from: Option<String>,
    watch: Option<OpenWatch>,
    /// `members` may be out of date: list before trusting it.
    stale: bool,
    /// Set by `leave` (even one that failed): nothing is written any more.
    left: bool,
}

impl LeaseMembership {
    /// Join the group (see the module's rules) and start renewing.
    pub(super) async fn enroll(lease: MemberLease) -> Result<Self, StoreError> {
        let written = lease.join().await?;
        let own = Arc::new(Mutex::new(Own {
            lease: written,
            displaced: None,
        }));
        let renewer = tokio::spawn(lease.clone().keep_alive(own.clone()));
        Ok(LeaseMembership {
            lease,
            own,
            renewer,
            members: BTreeMap::new(),
            resume_from: None,
            watch: None,
            stale: true,
            left: false,
        })
    }

    /// List the group again: every Lease observed anew (a record unchanged since the last look
    /// keeps its time).
    async fn refresh(&mut self) -> Result<(), StoreError> {
        let list = self.lease.list().await?;
        let mut members = BTreeMap::new();
        for lease in list.items {
            let Some(name) = lease.metadata.name.clone() else {
                continue;
            };
            members.insert(name.clone(), Seen::observe(self.members.get(&name), lease));
        }
        self.members = members;
        self.resume_from = list.metadata.resource_version;
        self.watch = None;
        self.stale = false;
        Ok(())
    }

    /// The live members that have announced at `now`, sorted by identity, and when the first
    /// of them expires unless renewed.
    fn live(&self, now: Instant) -> (Vec<Member>, Option<Instant>) {
        let mut live = BTreeMap::new();
        let mut next_expiry: Option<Instant> = None;
        for seen in self.members.values() {
            let expiry = seen.expiry(self.lease.timing.lease_duration);
            let Some(identity) = seen.record.holder() else {
                continue;
            };
            if now >= expiry {
                continue;
            }
            next_expiry = Some(next_expiry.map_or(expiry, |t| t.min(expiry)));
            let annotations = seen.lease.metadata.annotations.as_ref();
            let Some(eligible) = annotations
                .and_then(|a| a.get(ELIGIBLE_ANNOTATION))
                .and_then(|json| serde_json::from_str::<BTreeSet<String>>(json).ok())
            else {
                continue;
            };
            live.insert(identity.to_owned(), eligible);
        }
        let members = live
            .into_iter()
            .map(|(identity, eligible)| Member { identity, eligible })
            .collect();
        (members, next_expiry)
    }

    /// Wait for a change of the group's Leases (a watch event) or `until`.
    async fn wait(&mut self, until: Option<Instant>) -> Result<(), StoreError> {
        if self.watch.is_none() {
            let params = WatchParams::default()
                .labels(&self.lease.selector())
                .timeout(WATCH_SECONDS);
            let from = self.resume_from.clone().unwrap_or_else(|| "0".to_owned());
            let stream = self
                .lease
                .bounded("watch", self.lease.api.watch(&params, &from))
                .await?;
            self.watch = Some((std::sync::Mutex::new(stream.boxed()), Instant::now()));
        }
        let deadline = lease_watch::deadline(until);
        tokio::pin!(deadline);
        let retry = self.lease.timing.retry_period;
        let what = self.lease.group.as_str();
        match lease_watch::next_event(
            &mut self.watch,
            &mut self.resume_from,
            retry,
            deadline,
            what,
        )
        .await
        {
            Event::Applied(lease) => {
                if let Some(rv) = &lease.metadata.resource_version {
                    self.resume_from = Some(rv.clone());
                }
                if let Some(name) = lease.metadata.name.clone() {
                    let seen = Seen::observe(self.members.get(&name), lease);
                    self.members.insert(name, seen);
                }
            }
            Event::Deleted(lease) => {
                if let Some(name) = &lease.metadata.name {
                    self.members.remove(name);
                }
            }
            Event::Ended { relist } => self.stale |= relist,
            Event::Deadline => {}
        }
        Ok(())
    }
}

impl Drop for LeaseMembership {
    /// Renewals stop; the Lease expires after one lease duration, as a dead process's does.
    fn drop(&mut self) {
        self.renewer.abort();
    }
}

#[async_trait::async_trait]
impl Membership for LeaseMembership {
    /// After [`Membership::leave`], writes nothing: a renewal would create the Lease again and
    /// list the member until it expired.
    async fn announce(&mut self, eligible: &BTreeSet<String>) -> Result<(), StoreError> {
        if self.left {
            return Ok(());
        }
        let mut own = self.own.lock().await;
        self.lease.renew(&mut own, Some(eligible)).await
    }

    async fn changed(&mut self, last_seen: &[Member]) -> Result<Vec<Member>, StoreError> {
        loop {
            if self.stale {
                self.refresh().await?;
            }
            let (live, next_expiry) = self.live(Instant::now());
            if live != last_seen {
                return Ok(live);
            }
            self.wait(next_expiry).await?;
        }
    }

    async fn leave(&mut self) -> Result<(), StoreError> {
        // A renewal in flight may finish first (cut off, the API server would log a 5xx
        // "context canceled"), within half the renew deadline; then renewals stop.
        self.left = true;
        let budget = self.lease.timing.renew_deadline / 2;
        let own = timeout(budget, self.own.lock()).await;
        self.renewer.abort();
        let mut own = match own {
            Ok(own) => own,
            Err(_) => self.own.lock().await,
        };
        self.lease.delete(&mut own).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_lease_names_are_valid_and_distinct() {
        let group = "b-0123456789abcdef";
        assert_eq!(
            member_lease_name(group, "baton-0"),
            "b-0123456789abcdef.baton-0"
        );
        let long = "x".repeat(300);
        for identity in ["Pod_A", "a..b", "-a", &long, ""] {
            let name = member_lease_name(group, identity);
            assert!(
                name.len() <= 253 && valid_dns_name(&name, true),
                "{identity}: {name}"
            );
            assert!(!name.contains(".."), "{name}");
        }
        assert_ne!(
            member_lease_name(group, "Pod_A"),
            member_lease_name(group, "Pod_B")
        );
        assert_ne!(
            member_lease_name(group, "a"),
            member_lease_name("b-1123456789abcdef", "a")
        );
    }
}
