//! The safety check of the fault and balance suites: a worker's active intervals, from the
//! `started`/`stopped` lines of the timer worker (`examples/timer_worker.rs`), never overlap
//! another's, and terms grow from one holder to the next.

use crate::field;

/// One worker's active interval, from its `started`/`stopped` lines.
#[derive(Debug, Clone)]
pub struct Interval {
    /// Index of the replica.
    pub replica: usize,
    pub term: u64,
    pub start: i128,
    /// `None` while it is active.
    pub stop: Option<i128>,
}

/// The intervals of replica `replica`'s worker from its output lines, in order.
///
/// # Errors
/// A malformed `started`/`stopped` line, or one out of order.
pub fn parse_intervals(replica: usize, lines: &[String]) -> Result<Vec<Interval>, String> {
    let mut intervals = Vec::new();
    let mut open: Option<Interval> = None;
    for line in lines {
        let started = line.starts_with("started ");
        if !started && !line.starts_with("stopped ") {
            continue;
        }
        let term = field(line, "term").and_then(|t| t.parse().ok());
        let mono = field(line, "mono").and_then(|t| t.parse().ok());
        let (Some(term), Some(mono)) = (term, mono) else {
            return Err(format!("malformed line {line:?}"));
        };
        match (started, open.take()) {
            (true, None) => {
                open = Some(Interval {
                    replica,
                    term,
                    start: mono,
                    stop: None,
                })
            }
            (false, Some(mut interval)) if interval.term == term && mono >= interval.start => {
                interval.stop = Some(mono);
                intervals.push(interval);
            }
            _ => {
                return Err(format!(
                    "{line:?} out of order (a start without a stop, a stop without its start)"
                ));
            }
        }
    }
    intervals.extend(open);
    Ok(intervals)
}

/// No two intervals (sorted by start) overlap, and terms grow: strictly from one holder to
/// another. `ids` names the replicas.
///
/// # Errors
/// The first violation, described.
pub fn check_intervals(intervals: &[Interval], ids: &[&str]) -> Result<(), String> {
    for pair in intervals.windows(2) {
        let (x, y) = (&pair[0], &pair[1]);
        let (xid, yid) = (ids[x.replica], ids[y.replica]);
        if x.stop.is_none_or(|stop| stop >= y.start) {
            return Err(format!(
                "{yid}'s worker started (term {}, mono {}) while {xid}'s (term {}, started at \
                 {}) had not stopped (stopped at {:?})",
                y.term, y.start, x.term, x.start, x.stop
            ));
        }
        if y.term < x.term || (x.replica != y.replica && y.term == x.term) {
            return Err(format!(
                "term {} of {yid} follows term {} of {xid}",
                y.term, x.term
            ));
        }
    }
    Ok(())
}

/// The lines of one election of a worker that follows several (`election=NAME` on each line).
pub fn of_election(lines: &[String], election: &str) -> Vec<String> {
    lines
        .iter()
        .filter(|l| field(l, "election") == Some(election))
        .cloned()
        .collect()
}

/// The checker itself: it must catch what it is there to catch.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interval_checker_catches_overlaps_and_stale_terms() {
        let lines = |text: &str| text.lines().map(str::to_owned).collect::<Vec<_>>();
        let a = parse_intervals(
        0,
        &lines("started term=1 mono=100\nClustered route (timer) x term=1 mono=150\nstopped term=1 mono=200"),
    )
    .unwrap();
        let check = |b: &str| {
            let mut all = a.clone();
            all.extend(parse_intervals(1, &lines(b)).unwrap());
            all.sort_by_key(|x| x.start);
            check_intervals(&all, &["a", "b"])
        };
        assert_eq!(check("started term=2 mono=201"), Ok(()));
        assert!(
            check("started term=2 mono=200").is_err(),
            "start at the stop"
        );
        assert!(check("started term=2 mono=150\nstopped term=2 mono=160").is_err());
        assert!(
            check("started term=1 mono=300").is_err(),
            "the same term, another holder"
        );
        assert!(check("started term=0 mono=300").is_err(), "an older term");
        assert!(
            check("started term=2 mono=50").is_err(),
            "started before, never stopped"
        );
        // The same holder again in the same term (a paused daemon that kept its file lock).
        let mut again = a.clone();
        again.extend(parse_intervals(0, &lines("started term=1 mono=300")).unwrap());
        assert_eq!(check_intervals(&again, &["a"]), Ok(()));
        assert!(parse_intervals(0, &lines("stopped term=1 mono=1")).is_err());
        assert!(
            parse_intervals(0, &lines("started term=1 mono=1\nstarted term=2 mono=2")).is_err()
        );
        assert!(
            parse_intervals(0, &lines("started term=1 mono=1\nstopped term=2 mono=2")).is_err()
        );
    }
}
