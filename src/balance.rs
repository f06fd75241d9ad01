//! Balancing: which member of a group should lead each election.
//!
//! Daemons that run the same elections with `--balance` form a group. Every member reads the same
//! [`Snapshot`] from the store (the live members, what each is ready for, who holds what) and
//! computes [`plan`] from it. The plan is a pure function of the snapshot, so members agree
//! without talking. It keeps every holding it can and moves only what fair shares require. A plan
//! only says who should campaign and who should hand over; each move is an ordinary graceful
//! hand-off under the unchanged lease rules.

use std::{
    collections::{BTreeMap, BTreeSet},
    hash::Hasher,
};

/// The name of the group that daemons running `elections` form: `b-` and 16 hex digits of the
/// FNV-1a hash of the sorted, distinct names. Daemons that run the same elections compute the
/// same name, whatever their order on the command line or their version; the name fits a file
/// name, an etcd key and a Kubernetes object name.
pub fn group_name<'a>(elections: impl IntoIterator<Item = &'a str>) -> String {
    let sorted: BTreeSet<&str> = elections.into_iter().collect();
    let mut hasher = fnv::FnvHasher::default();
    for name in sorted {
        hasher.write(name.as_bytes());
        // A separator no election name contains, so that ["ab"] and ["a", "b"] differ.
        hasher.write(b"\n");
    }
    format!("b-{:016x}", hasher.finish())
}

/// The group as this member sees it, for `baton status` and the metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupView {
    /// The group's name (see [`group_name`]).
    pub group: String,
    /// The live members, sorted by identity; empty until the store's membership is read.
    pub members: Vec<MemberView>,
}

/// One member of the group, as this member sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberView {
    /// Its identity.
    pub identity: String,
    /// How many elections it may lead.
    pub eligible: usize,
    /// How many elections it leads now.
    pub leads: usize,
    /// How many elections the plan gives it.
    pub share: usize,
}

/// A live member of the group, as the store shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The member's identity (`--identity`).
    pub identity: String,
    /// The elections this member may lead: all of them with `--campaign always`; with
    /// `--campaign when-ready`, those whose worker declared itself ready.
    pub eligible: BTreeSet<String>,
}

/// One election as the store shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seat {
    /// The election's name.
    pub election: String,
    /// Who holds it now, or the successor it was released to, if any.
    pub holder: Option<String>,
}

/// What every member reads from the store.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// The live members; a member that stopped or whose membership expired is not here.
    pub members: Vec<Member>,
    /// Every election of the group.
    pub seats: Vec<Seat>,
}

/// Who should lead each election: `None` where no live member may lead it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// The election's name to the member that should lead it.
    pub owners: BTreeMap<String, Option<String>>,
}

/// What one member should do in one election, by [`Plan::step`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Lead it: campaign, or keep leading.
    Lead,
    /// It leads but should not: hand over gracefully to this member.
    HandOver(String),
    /// Another member should lead it: do not campaign.
    StandBy,
}

impl Plan {
    /// What `identity` should do in `seat`'s election.
    pub fn step(&self, identity: &str, seat: &Seat) -> Step {
        let owner = self.owners.get(&seat.election).cloned().flatten();
        match owner {
            Some(owner) if owner == identity => Step::Lead,
            Some(owner) if seat.holder.as_deref() == Some(identity) => Step::HandOver(owner),
            // Nobody may lead it: a holder keeps it rather than leave it vacant.
            None if seat.holder.as_deref() == Some(identity) => Step::Lead,
            _ => Step::StandBy,
        }
    }

    /// How many elections each member should lead.
    pub fn shares(&self) -> BTreeMap<&str, usize> {
        let mut shares = BTreeMap::new();
        for owner in self.owners.values().flatten() {
            *shares.entry(owner.as_str()).or_default() += 1;
        }
        shares
    }
}

/// The plan for `snapshot`: fair shares, each `floor(E/M)` or `ceil(E/M)` where eligibility
/// allows, reached with the fewest moves.
///
/// 1. A holder that is a live member eligible for its election keeps it, for now.
/// 2. Shares: of the E elections some member may lead, each of the M members gets `E / M`, and
///    `E % M` members one more: first those that keep more than `E / M` already, then the
///    others; each group in identity order.
/// 3. A member over its share gives up its surplus: first what a member under its share may
///    take, last-sorted first; it keeps what no such member may take. (Where every member may
///    lead every election: it keeps the elections that sort first.)
/// 4. The elections given up or vacant, in name order, are dealt out in runs: the first
///    member in identity order that is under its share and eligible takes the next one. An
///    election nobody under its share may take stays with its holder, or if vacant goes to
///    the eligible member with the fewest elections.
///
/// Where every member may lead every election, the plan stays the same while its moves happen,
/// in any order: a member taking one of its run, or giving up one of its surplus, changes
/// neither the groups of step 2 nor the other runs of step 4. So members that read the store at
/// different moments still agree on who takes what, and no election moves twice.
pub fn plan(snapshot: &Snapshot) -> Plan {
    let members: BTreeMap<&str, &Member> = snapshot
        .members
        .iter()
        .map(|m| (m.identity.as_str(), m))
        .collect();
    let mut seats: Vec<&Seat> = snapshot.seats.iter().collect();
    seats.sort_by(|a, b| a.election.cmp(&b.election));
    seats.dedup_by(|a, b| a.election == b.election);
    let eligible = |member: &str, election: &str| {
        members
            .get(member)
            .is_some_and(|m| m.eligible.contains(election))
    };
    let (mut kept, vacant) = keep(&seats, &members, eligible);
    let share = shares(&seats, &members, &kept);
    let mut moving: Vec<(&str, Option<&str>)> = vacant.into_iter().map(|e| (e, None)).collect();
    moving.extend(give_up(&mut kept, &share, eligible));
    moving.sort();
    deal(moving, kept, &members, &share, eligible)
}

/// Step 1 of [`plan`]: what each member keeps (a holder that is a live member eligible for its
/// election), and the elections nobody keeps, in name order.
fn keep<'a>(
    seats: &[&'a Seat],
    members: &BTreeMap<&'a str, &Member>,
    eligible: impl Fn(&str, &str) -> bool,
) -> (BTreeMap<&'a str, Vec<&'a str>>, Vec<&'a str>) {
    let mut kept: BTreeMap<&str, Vec<&str>> = members.keys().map(|&m| (m, Vec::new())).collect();
    let mut vacant = Vec::new();
    for seat in seats {
        match seat.holder.as_deref() {
            Some(holder) if eligible(holder, &seat.election) => {
                kept.entry(holder).or_default().push(&seat.election);
            }
            _ => vacant.push(seat.election.as_str()),
        }
    }
    (kept, vacant)
}

/// Step 2 of [`plan`]: each member's share.
fn shares<'a>(
    seats: &[&Seat],
    members: &BTreeMap<&'a str, &Member>,
    kept: &BTreeMap<&'a str, Vec<&'a str>>,
) -> BTreeMap<&'a str, usize> {
    let assignable = seats
        .iter()
        .filter(|s| members.values().any(|m| m.eligible.contains(&s.election)))
        .count();
    // A member eligible for nothing has no share, so it does not lower the others'.
    let mut ranked: Vec<&str> = members
        .iter()
        .filter(|(_, m)| !m.eligible.is_empty())
        .map(|(&id, _)| id)
        .collect();
    let (base, extra) = match ranked.len() {
        0 => (0, 0),
        m => (assignable / m, assignable % m),
    };
    // Not by how much each keeps: that changes as members fill their shares, and the ranking
    // must not. Only reaching past `base` does, and only for a member already ranked in.
    ranked.sort_by_key(|m| (kept[m].len() <= base, *m));
    ranked
        .iter()
        .enumerate()
        .map(|(rank, &m)| (m, base + usize::from(rank < extra)))
        .chain(
            members
                .iter()
                .filter(|(_, m)| m.eligible.is_empty())
                .map(|(&id, _)| (id, 0)),
        )
        .collect()
}

/// Step 4 of [`plan`]: deal out what moves (vacant, or given up by `from`), in name order, to
/// the first member under its share that may take it; the plan is what each member then holds.
fn deal<'a>(
    moving: Vec<(&'a str, Option<&'a str>)>,
    mut kept: BTreeMap<&'a str, Vec<&'a str>>,
    members: &BTreeMap<&'a str, &Member>,
    share: &BTreeMap<&'a str, usize>,
    eligible: impl Fn(&str, &str) -> bool,
) -> Plan {
    let mut owners: BTreeMap<String, Option<String>> = BTreeMap::new();
    for (member, elections) in &kept {
        for election in elections {
            owners.insert((*election).to_owned(), Some((*member).to_owned()));
        }
    }
    for (election, from) in moving {
        let count = |m: &str| kept[m].len();
        let under = members
            .keys()
            .copied()
            .find(|&m| count(m) < share[m] && eligible(m, election));
        let to = match from {
            // Given up, and nobody under its share may take it: the holder keeps it, since
            // moving it would only move the surplus.
            Some(_) => under.or(from),
            None => under.or_else(|| {
                members
                    .keys()
                    .copied()
                    .filter(|&m| eligible(m, election))
                    .min_by_key(|&m| (count(m), m))
            }),
        };
        if let Some(to) = to {
            kept.get_mut(to).expect("a member").push(election);
        }
        owners.insert(election.to_owned(), to.map(str::to_owned));
    }
    Plan { owners }
}

/// Step 3 of [`plan`]: each member over its share gives up its surplus, what a member under
/// its share may take first (last-sorted first), and keeps the rest; returns what it gave up,
/// with the member.
fn give_up<'a>(
    kept: &mut BTreeMap<&'a str, Vec<&'a str>>,
    share: &BTreeMap<&'a str, usize>,
    eligible: impl Fn(&str, &str) -> bool,
) -> Vec<(&'a str, Option<&'a str>)> {
    let under: Vec<&str> = kept
        .iter()
        .filter(|(m, elections)| elections.len() < share[*m])
        .map(|(m, _)| *m)
        .collect();
    let mut given_up = Vec::new();
    for (&member, elections) in kept.iter_mut() {
        let surplus = elections.len().saturating_sub(share[member]);
        if surplus == 0 {
            continue;
        }
        // Kept first: what nobody under its share may take, then the rest in name order.
        elections.sort_by_key(|e| (under.iter().any(|&u| eligible(u, e)), *e));
        let keep = elections.len() - surplus;
        given_up.extend(elections.drain(keep..).map(|e| (e, Some(member))));
        elections.sort();
    }
    given_up
}

#[cfg(test)]
mod tests;
