//! Maglev consistent hashing (Eisenbud et al., NSDI '16), as Katran uses it for new flows.
//!
//! Each worker gets a permutation of the table's slots from two hashes of its name: an `offset`
//! and a `skip` (the table size is prime, so every skip visits every slot). Workers then take turns
//! claiming their next unclaimed preferred slot until the table is full. Removing a worker only
//! frees its own slots (plus a little churn), so Initial packets of other workers' new connections
//! keep landing where they did.

/// One participant of the table.
#[derive(Clone, Debug)]
pub struct Member<'a> {
    /// Stable identity: the permutation depends only on this, not on the member's position.
    pub key: &'a str,
    /// Relative share of the table (1 = normal).
    pub weight: u32,
    /// Value stored in the slots this member wins (the worker index).
    pub value: u32,
}

/// Builds a table of `size` slots (`size` must be prime). Returns an empty vector when there are
/// no members.
pub fn build(members: &[Member<'_>], size: u32) -> Vec<u32> {
    assert!(is_prime(size), "Maglev table size must be prime");
    if members.is_empty() {
        return Vec::new();
    }
    let m = size as u64;
    // Sort by key so the result does not depend on the order members were listed in.
    let mut members: Vec<&Member<'_>> = members.iter().collect();
    members.sort_by(|a, b| a.key.cmp(b.key));

    let perms: Vec<(u64, u64)> = members
        .iter()
        .map(|mb| {
            let offset = hash(mb.key.as_bytes(), SEED_OFFSET) % m;
            let skip = hash(mb.key.as_bytes(), SEED_SKIP) % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; members.len()];
    let mut table = vec![u32::MAX; size as usize];
    let mut filled = 0u64;
    'fill: loop {
        for (i, mb) in members.iter().enumerate() {
            // A weight-w member claims w slots per round.
            for _ in 0..mb.weight.max(1) {
                let (offset, skip) = perms[i];
                let mut slot = (offset + next[i] * skip) % m;
                while table[slot as usize] != u32::MAX {
                    next[i] += 1;
                    slot = (offset + next[i] * skip) % m;
                }
                table[slot as usize] = mb.value;
                next[i] += 1;
                filled += 1;
                if filled == m {
                    break 'fill;
                }
            }
        }
    }
    table
}

const SEED_OFFSET: u64 = 0x6261_746f_6e5f_6f66; // "baton_of"
const SEED_SKIP: u64 = 0x6261_746f_6e5f_736b; // "baton_sk"

/// A stable 64-bit hash (FNV-1a mixed through the splitmix64 finaliser). Stable across Rust
/// versions and runs, unlike `DefaultHasher`, so a restarted controller rebuilds the same table.
fn hash(bytes: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2u32;
    while (d as u64) * (d as u64) <= n as u64 {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::MAGLEV_TABLE_SIZE;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("worker-{i}")).collect()
    }

    fn table_for(names: &[String]) -> Vec<u32> {
        let members: Vec<Member<'_>> = names
            .iter()
            .enumerate()
            .map(|(i, n)| Member {
                key: n,
                weight: 1,
                value: i as u32,
            })
            .collect();
        build(&members, MAGLEV_TABLE_SIZE)
    }

    fn moved(a: &[u32], a_names: &[String], b: &[u32], b_names: &[String]) -> usize {
        a.iter()
            .zip(b)
            .filter(|(x, y)| a_names[**x as usize] != b_names[**y as usize])
            .count()
    }

    #[test]
    fn every_slot_is_filled_and_shares_are_even() {
        let n = names(7);
        let t = table_for(&n);
        assert_eq!(t.len(), MAGLEV_TABLE_SIZE as usize);
        let mut counts = [0usize; 7];
        for &v in &t {
            counts[v as usize] += 1;
        }
        let ideal = MAGLEV_TABLE_SIZE as usize / 7;
        for c in counts {
            // Maglev's round-robin fill keeps shares within a slot or so of ideal.
            assert!(c.abs_diff(ideal) <= 2, "share {c} vs ideal {ideal}");
        }
    }

    #[test]
    fn removing_or_adding_one_of_n_moves_about_one_nth() {
        for n in [2usize, 3, 5, 10, 31] {
            let all = names(n + 1);
            let before = table_for(&all[..n]);
            let after = table_for(&all);
            let m = moved(&before, &all[..n], &after, &all);
            let share = MAGLEV_TABLE_SIZE as f64 / (n + 1) as f64;
            // The new worker takes ~1/(n+1) of the slots; Maglev adds only small churn on top.
            eprintln!(
                "add 1 to {n}: {m} of {MAGLEV_TABLE_SIZE} slots moved (1/(n+1) = {share:.0})"
            );
            assert!(
                m as f64 >= 0.9 * share,
                "n={n}: moved {m}, expected about {share:.0}"
            );
            assert!(
                (m as f64) <= 1.3 * share,
                "n={n}: moved {m}, bound {:.0}",
                1.3 * share
            );

            // Removing worker k: its slots move, almost nothing else does.
            let k = n / 2;
            let without: Vec<String> = all[..n]
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != k)
                .map(|(_, s)| s.clone())
                .collect();
            let t_without = table_for(&without);
            let m = moved(&before, &all[..n], &t_without, &without);
            let share = MAGLEV_TABLE_SIZE as f64 / n as f64;
            eprintln!("remove 1 of {n}: {m} slots moved (1/n = {share:.0})");
            assert!(
                (m as f64) <= 1.3 * share,
                "remove n={n}: moved {m}, bound {:.0}",
                1.3 * share
            );
            let others_moved = before
                .iter()
                .zip(&t_without)
                .filter(|(x, y)| **x as usize != k && all[**x as usize] != without[**y as usize])
                .count();
            assert!(
                (others_moved as f64) <= 0.3 * share,
                "remove n={n}: {others_moved} slots of staying workers moved"
            );
        }
    }

    #[test]
    fn order_of_members_does_not_matter_and_weights_scale_shares() {
        let n = names(3);
        let fwd: Vec<Member<'_>> = n
            .iter()
            .enumerate()
            .map(|(i, s)| Member {
                key: s,
                weight: 1,
                value: i as u32,
            })
            .collect();
        let mut rev = fwd.clone();
        rev.reverse();
        assert_eq!(build(&fwd, 65537), build(&rev, 65537));

        let weighted = vec![
            Member {
                key: "a",
                weight: 3,
                value: 0,
            },
            Member {
                key: "b",
                weight: 1,
                value: 1,
            },
        ];
        let t = build(&weighted, 65537);
        let a = t.iter().filter(|&&v| v == 0).count() as f64;
        assert!(
            (a / 65537.0 - 0.75).abs() < 0.01,
            "weight 3:1 gave share {}",
            a / 65537.0
        );
    }

    #[test]
    fn empty_members_give_an_empty_table() {
        assert!(build(&[], 65537).is_empty());
        assert!(is_prime(65537) && !is_prime(65536));
    }
}
