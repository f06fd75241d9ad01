//! Membership of a balancing group in the etcd store: a key per member,
//! `<prefix>_members/<group>/<identity>`, bound to a session lease of the member's own. Its value
//! is the member's record (JSON: identity and the elections it may lead), empty until the member
//! announces. A member that dies stops renewing, and its key goes with its lease within one
//! lease duration; one that leaves revokes the lease, which deletes the key at once. Members read
//! the group's range and watch it from the revision after the read, so a change is seen at once.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp, WatchOptions, WatchStream,
};
use serde::Deserialize;
use serde_json::Value;

use super::client::{request_timeout, session_ttl_secs};
use super::error::EtcdError;
use super::queue::{call_within, first_kv, text};
use super::revoke::revoke_when_expired;
use super::session::{OwnedTask, Renewal, Session};
use crate::{
    balance::Member,
    store::{Membership, StoreError, Timing},
};

/// The segment after the store's prefix under which every group's members live. An election's
/// keys are `<prefix><election>/…` and `<prefix><election>.successor`, and an election name
/// starts with a lowercase letter or a digit (`config::valid_election_name`), so no election
/// key has `_` right after the prefix: member keys and election keys never meet, whatever the
/// group is called (a group name, `b-` and hex digits, is itself a valid election name).
const MEMBERS: &str = "_members/";

/// The key range of `group`'s members under `prefix`. Group names (`balance::group_name`) hold
/// no `/`, so one group's range never holds another group's keys.
pub(super) fn member_range(prefix: &str, group: &str) -> String {
    format!("{prefix}{MEMBERS}{group}/")
}

/// A member's record, the value of its key.
#[derive(Debug, Deserialize)]
struct Record {
    identity: String,
    eligible: BTreeSet<String>,
}

/// The value of a member key for `identity`, which may lead `eligible`.
fn encode(identity: &str, eligible: &BTreeSet<String>) -> Vec<u8> {
    let eligible = eligible.iter().cloned().map(Value::String).collect();
    let record = serde_json::Map::from_iter([
        ("identity".to_owned(), Value::String(identity.to_owned())),
        ("eligible".to_owned(), Value::Array(eligible)),
    ]);
    Value::Object(record).to_string().into_bytes()
}

/// The member that a key in `range` and its value describe: `None` while it has not announced (empty value).
/// A record that does not parse, or that names another identity than its key, is an error
/// naming the key rather than a member quietly left out: every member would leave it out alike,
/// but the one it belongs to (another Baton version, say) would count itself in, and the plans
/// of the group would disagree.
fn parse_member(range: &str, key: &[u8], value: &[u8]) -> Result<Option<Member>, EtcdError> {
    if value.is_empty() {
        return Ok(None);
    }
    let key = text(key);
    let record: Record =
        serde_json::from_slice(value).map_err(|source| EtcdError::CorruptMember {
            key: key.clone(),
            source,
        })?;
    if key.strip_prefix(range) != Some(record.identity.as_str()) {
        return Err(EtcdError::MisnamedMember {
            key,
            identity: record.identity,
        });
    }
    Ok(Some(Member {
        identity: record.identity,
        eligible: record.eligible,
    }))
}

/// One read of the group.
struct Group {
    /// The revision of the read; the watch starts after it.
    revision: i64,
    /// The members that announced, sorted by identity.
    members: Vec<Member>,
    /// Whether our key is there, on our session lease.
    mine: bool,
    /// The session leases of the other members' keys.
    others: BTreeSet<i64>,
}

/// This daemon's place in a balancing group.
///
/// - **enroll** grants a session lease (TTL `--lease-duration`, kept alive by the session's
///   owned task) and creates the member key on it in a transaction on create revision 0: a key
///   that exists on another lease is another live daemon with this identity, refused.
/// - **announce** replaces the key's value, guarded by the create revision it was created with.
/// - **changed** reads the group, then waits on a watch of its range, started after the read and
///   kept across calls, so that a cancelled call misses nothing. A compacted watch is dropped and
///   the group read again. If our own key is gone (the lease expired while etcd was out of
///   reach, or someone deleted it), it is written again, on a new session if need be.
/// - **leave** revokes the session lease, which deletes the key with it. A drop without
///   `leave` is a crash: the keep-alive stops and the key goes when its lease expires.
pub(super) struct EtcdMembership {
    client: Client,
    endpoints: String,
    /// `<prefix>_members/<group>/`: the key range of the group.
    range: String,
    /// `<range><identity>`: our member key.
    key: String,
    identity: String,
    ttl_secs: i64,
    request_timeout: Duration,
    /// `None` once this member left the group: nothing is written again.
    session: Option<Session>,
    /// Our key's create revision, while we know the key exists.
    created: Option<i64>,
    /// Our key's value: empty until the first announce, then the record.
    value: Vec<u8>,
    /// A watch on the group's range, started right after an earlier read.
    watch: Option<WatchStream>,
    /// For each other member's session lease, a task that revokes it once etcd's clock shows
    /// it expired, rather than wait up to 500 ms more for etcd's lessor: a dead member drops
    /// out as soon as its lease ends, as a dead election holder does.
    reapers: BTreeMap<i64, OwnedTask>,
}

impl EtcdMembership {
    /// Enroll `identity` in the group whose key range is `range`.
    ///
    /// # Errors
    /// etcd is unreachable or refuses, or [`EtcdError::MemberInUse`] when another live daemon
    /// holds the identity's key.
    pub(super) async fn enroll(
        client: Client,
        endpoints: String,
        range: String,
        identity: &str,
        timing: Timing,
    ) -> Result<Self, StoreError> {
        let ttl_secs = session_ttl_secs(timing);
        let request_timeout = request_timeout(timing);
        let session = Session::start(&client, ttl_secs, request_timeout, &endpoints).await?;
        let mut membership = EtcdMembership {
            key: format!("{range}{identity}"),
            client,
            endpoints,
            range,
            identity: identity.to_owned(),
            ttl_secs,
            request_timeout,
            session: Some(session),
            created: None,
            value: Vec::new(),
            watch: None,
            reapers: BTreeMap::new(),
        };
        membership.write().await?;
        Ok(membership)
    }

    /// Put our key with [`Self::value`] on our session lease: created if absent, replaced only
    /// while it is the key we created. Starts a new session first if the lease is gone (its key
    /// went with it). Does nothing once this member left.
    async fn write(&mut self) -> Result<(), StoreError> {
        loop {
            let Some(session) = &mut self.session else {
                return Ok(());
            };
            if session.gone() {
                tracing::info!(
                    lease = format!("{:x}", session.lease),
                    key = self.key,
                    "member lease gone; enrolling again on a new session"
                );
                self.created = None;
                *session = Session::start(
                    &self.client,
                    self.ttl_secs,
                    self.request_timeout,
                    &self.endpoints,
                )
                .await?;
            }
            let lease = session.lease;
            let key = self.key.as_str();
            let txn = Txn::new()
                .when([Compare::create_revision(
                    key,
                    CompareOp::Equal,
                    self.created.unwrap_or(0),
                )])
                .and_then([TxnOp::put(
                    key,
                    self.value.clone(),
                    Some(PutOptions::new().with_lease(lease)),
                )])
                .or_else([TxnOp::get(key, None)]);
            let mut kv = self.client.kv_client();
            let response = call_within(
                self.request_timeout,
                "write member key",
                kv.txn(txn),
                |source| EtcdError::WriteMember {
                    key: key.to_owned(),
                    source,
                },
            )
            .await?;
            if response.succeeded() {
                if self.created.is_none() {
                    self.created = response.header().map(|h| h.revision());
                }
                return Ok(());
            }
            match first_kv(response.op_responses().first()) {
                // Created on our lease by a call that was cancelled before it could record it.
                Some(kv) if kv.lease() == lease => self.created = Some(kv.create_revision()),
                Some(kv) => {
                    return Err(EtcdError::MemberInUse {
                        key: self.key.clone(),
                        lease: kv.lease(),
                    }
                    .into());
                }
                None => {
                    // Deleted since we created it: by hand, or with our lease (revoked, or
                    // expired while etcd was out of reach). A renewal tells which (it marks the
                    // session gone); then create the key again.
                    self.created = None;
                    if let Renewal::Failed(error) = session.renew().await {
                        return Err(error);
                    }
                }
            }
        }
    }

    /// Read the group's members at one revision.
    async fn read(&self) -> Result<Group, StoreError> {
        let mut kv = self.client.kv_client();
        let range = self.range.as_str();
        let response = call_within(
            self.request_timeout,
            "read member keys",
            kv.get(range, Some(GetOptions::new().with_prefix())),
            |source| EtcdError::ReadMembers {
                range: range.to_owned(),
                source,
            },
        )
        .await?;
        let lease = self.session.as_ref().map(|s| s.lease);
        let mut members = Vec::new();
        let mut mine = false;
        let mut others = BTreeSet::new();
        for kv in response.kvs() {
            if kv.key() == self.key.as_bytes() {
                mine |= Some(kv.lease()) == lease;
            } else if kv.lease() != 0 {
                others.insert(kv.lease());
            }
            members.extend(parse_member(range, kv.key(), kv.value())?);
        }
        members.sort_by(|a, b| a.identity.cmp(&b.identity));
        Ok(Group {
            revision: response.header().map_or(0, |h| h.revision()),
            members,
            mine,
            others,
        })
    }

    /// Follow the expiry of exactly `others`, the other members' leases now.
    fn reap(&mut self, others: &BTreeSet<i64>) {
        self.reapers.retain(|lease, _| others.contains(lease));
        for &lease in others {
            let limit = self.request_timeout;
            let leases = self.client.lease_client();
            self.reapers.entry(lease).or_insert_with(|| {
                OwnedTask::spawn(revoke_when_expired(leases, lease, limit, "member"))
            });
        }
    }

    /// Wait until something in the group's range changes after `revision`, or our session lease
    /// is gone. Returns at once (`Ok`) when the watch was compacted: read again.
    async fn wait(&mut self, revision: i64) -> Result<(), StoreError> {
        let watch_error = |range: &str| {
            let key = range.to_owned();
            move |source| EtcdError::Watch { key, source }
        };
        if self.watch.is_none() {
            let options = WatchOptions::new()
                .with_prefix()
                .with_start_revision(revision + 1);
            let mut watches = self.client.watch_client();
            let stream = call_within(
                self.request_timeout,
                "watch member keys",
                watches.watch(self.range.as_str(), Some(options)),
                watch_error(&self.range),
            )
            .await?;
            self.watch = Some(stream);
        }
        let (Some(stream), session) = (&mut self.watch, &mut self.session) else {
            return Ok(());
        };
        loop {
            let message = match session {
                Some(session) => tokio::select! {
                    message = stream.message() => message,
                    () = session.wait_gone() => return Ok(()),
                },
                None => stream.message().await,
            };
            let error = match message {
                Ok(Some(response)) if response.canceled() => {
                    // Could not start at our revision (compacted): read again, watch anew.
                    self.watch = None;
                    return Ok(());
                }
                Ok(Some(response)) if !response.events().is_empty() => return Ok(()),
                // Created, or a progress notification.
                Ok(Some(_)) => continue,
                Ok(None) => EtcdError::WatchEnded {
                    key: self.range.clone(),
                },
                Err(source) => watch_error(&self.range)(source),
            };
            self.watch = None;
            return Err(error.into());
        }
    }
}

#[async_trait]
impl Membership for EtcdMembership {
    /// After [`Membership::leave`], records the elections but writes nothing: the member stays
    /// out of the group.
    async fn announce(&mut self, eligible: &BTreeSet<String>) -> Result<(), StoreError> {
        self.value = encode(&self.identity, eligible);
        self.write().await
    }

    async fn changed(&mut self, last_seen: &[Member]) -> Result<Vec<Member>, StoreError> {
        loop {
            let group = self.read().await?;
            self.reap(&group.others);
            if !group.mine && self.session.is_some() {
                // Our key is gone though we did not leave: write it again and read again.
                self.write().await?;
                continue;
            }
            if group.members != last_seen {
                return Ok(group.members);
            }
            self.wait(group.revision).await?;
        }
    }

    async fn leave(&mut self) -> Result<(), StoreError> {
        // Taken first, so that even a failed or cancelled revoke stops the keep-alive: the key
        // then goes when its lease expires.
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        self.created = None;
        let mut leases = self.client.lease_client();
        let lease = session.lease;
        let revoked = call_within(
            self.request_timeout,
            "revoke member lease",
            leases.revoke(lease),
            |source| EtcdError::Leave { lease, source },
        )
        .await;
        match revoked {
            Ok(_) => Ok(()),
            // Expired already: the key is gone.
            Err(StoreError::Etcd(EtcdError::Leave {
                source: etcd_client::Error::GRpcStatus(status),
                ..
            })) if status.code() == tonic::Code::NotFound => Ok(()),
            Err(error) => Err(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ErrorKind;

    const RANGE: &str = "baton/_members/b-0123456789abcdef/";

    #[test]
    fn a_record_reads_back_as_the_member_it_describes() {
        let eligible: BTreeSet<String> = ["e1".to_owned(), "e2".to_owned()].into();
        let key = format!("{RANGE}a/1");
        let member = parse_member(RANGE, key.as_bytes(), &encode("a/1", &eligible)).unwrap();
        assert_eq!(
            member,
            Some(Member {
                identity: "a/1".to_owned(),
                eligible
            })
        );
    }

    #[test]
    fn a_member_that_has_not_announced_is_not_listed() {
        let member = parse_member(RANGE, format!("{RANGE}a").as_bytes(), b"").unwrap();
        assert_eq!(member, None);
    }

    #[test]
    fn a_foreign_or_misnamed_record_is_an_error_naming_the_key() {
        let key = format!("{RANGE}a");
        for value in [&b"not json"[..], br#"{"identity":"b","eligible":[]}"#] {
            let error = parse_member(RANGE, key.as_bytes(), value).unwrap_err();
            assert_eq!(error.kind(), ErrorKind::Invalid);
            assert!(error.to_string().contains(&key), "{error}");
        }
    }

    #[test]
    fn member_keys_lie_outside_every_election() {
        let range = member_range("baton/", "b-0123456789abcdef");
        let after_prefix = &range["baton/".len()..];
        assert!(!crate::config::valid_election_name(&after_prefix[..1]));
    }
}
