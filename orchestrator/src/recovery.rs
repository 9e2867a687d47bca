//! What becomes of a migration whose driver died: [`resolve`] decides, from what the two workers
//! say now, whether it committed (then a new driver finishes it: the flip, the wait for the LB
//! nodes, the source's release), rolled back (then only its record goes), or is still running
//! at the source (then it is left for a later look). Pure: the driver asks the workers and
//! carries out the [`Resolution`].
//!
//! The rule it keeps is the machine's: the override is written only once the target holds the
//! connection as its own (the commit happened), never for a held or absent import.
use baton_protocol::Cid;
use baton_protocol::worker::SourceState;
use serde::Serialize;

/// The target's view of the connection, from its connection list.
#[derive(Clone, Debug, PartialEq)]
pub enum TargetView {
    /// It does not list the connection.
    Absent,
    /// It holds the import, waiting for the commit (or the source's silence, then it drops it).
    Held,
    /// It runs the connection: the commit happened. `cids`: the CIDs the client may use.
    Live { cids: Vec<Cid> },
    /// It did not answer.
    Silent,
}

/// What the new driver does.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "resolution", rename_all = "snake_case")]
pub enum Resolution {
    /// Committed: write the flip of `flip` (`None`: it was written already), wait until every
    /// LB node applied it, then release the source if `release`, and end the record.
    Complete {
        flip: Option<Vec<Cid>>,
        release: bool,
    },
    /// Not committed: the connection carries on at the source (or is gone): end the record.
    RolledBack,
    /// The outcome is not known yet (the source still runs it, the target holds the import,
    /// or the source does not answer): leave the record for a later look.
    Undecided { why: &'static str },
}

/// Decides a dead driver's migration. `flipped`: its record says the flip was written;
/// `source`: the source's [`SourceState`], `None` when it did not answer.
pub fn resolve(flipped: bool, source: Option<SourceState>, target: &TargetView) -> Resolution {
    let release = source == Some(SourceState::Forwarding);
    if flipped {
        // The flip was written only after the commit: whatever the workers say now, finish.
        return Resolution::Complete {
            flip: None,
            release,
        };
    }
    match (source, target) {
        (Some(SourceState::InFlight), _) => Resolution::Undecided {
            why: "the source is still running it",
        },
        // Committed: the source either forwards (released below) or already gave up
        // forwarding; the flip lets the client's datagrams reach the target either way.
        (_, TargetView::Live { cids }) => Resolution::Complete {
            flip: Some(cids.clone()),
            release,
        },
        (_, TargetView::Held) => Resolution::Undecided {
            why: "the target holds the import and awaits the commit",
        },
        (_, TargetView::Silent) => Resolution::Undecided {
            why: "the target does not answer",
        },
        (None, TargetView::Absent) => Resolution::Undecided {
            why: "the source does not answer",
        },
        // A source that forwards although the target lost the connection: nothing to flip to.
        (Some(SourceState::Forwarding), TargetView::Absent) => Resolution::Complete {
            flip: None,
            release: true,
        },
        (Some(SourceState::Unknown), TargetView::Absent) => Resolution::RolledBack,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live() -> TargetView {
        TargetView::Live {
            cids: vec!["0102".parse().unwrap()],
        }
    }

    /// Every pair of what the source and the target may say.
    fn every_answer() -> impl Iterator<Item = (Option<SourceState>, TargetView)> {
        let sources = [
            None,
            Some(SourceState::InFlight),
            Some(SourceState::Forwarding),
            Some(SourceState::Unknown),
        ];
        sources.into_iter().flat_map(|source| {
            [
                TargetView::Absent,
                TargetView::Held,
                TargetView::Silent,
                live(),
            ]
            .map(|target| (source, target))
        })
    }

    #[test]
    fn a_flip_on_record_is_always_finished() {
        for (source, target) in every_answer() {
            assert_eq!(
                resolve(true, source, &target),
                Resolution::Complete {
                    flip: None,
                    release: source == Some(SourceState::Forwarding)
                },
                "{source:?} {target:?}"
            );
        }
    }

    #[test]
    fn an_override_is_written_only_for_a_connection_the_target_runs() {
        for (source, target) in every_answer() {
            if let Resolution::Complete { flip: Some(_), .. } = resolve(false, source, &target) {
                assert_eq!(target, live(), "{source:?}");
                assert_ne!(source, Some(SourceState::InFlight));
            }
        }
    }

    #[test]
    fn the_common_cases() {
        assert_eq!(
            resolve(false, Some(SourceState::Forwarding), &live()),
            Resolution::Complete {
                flip: Some(vec!["0102".parse().unwrap()]),
                release: true
            }
        );
        // The source gave up forwarding (its deadline) but the target still runs it.
        assert_eq!(
            resolve(false, Some(SourceState::Unknown), &live()),
            Resolution::Complete {
                flip: Some(vec!["0102".parse().unwrap()]),
                release: false
            }
        );
        assert_eq!(
            resolve(false, Some(SourceState::Unknown), &TargetView::Absent),
            Resolution::RolledBack
        );
        assert!(matches!(
            resolve(false, Some(SourceState::InFlight), &TargetView::Absent),
            Resolution::Undecided { .. }
        ));
        assert!(matches!(
            resolve(false, None, &TargetView::Absent),
            Resolution::Undecided { .. }
        ));
    }
}
