//! Which core node an edge uses: rendezvous (highest random weight) hashing of the edge id over
//! the configured endpoints, so adding a node moves only the edges that hash to it; the next in
//! the order takes over when one is lost. Pure.

/// Endpoint indices in preference order for `edge_id`.
pub fn preference(edge_id: &str, endpoints: &[String]) -> Vec<usize> {
    let mut scored: Vec<(u64, usize)> = endpoints.iter().enumerate().map(|(i, e)| (weight(edge_id, e), i)).collect();
    scored.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    scored.into_iter().map(|(_, i)| i).collect()
}

/// FNV-1a over `edge \0 endpoint`, then a 64-bit finaliser: stable across builds and
/// platforms (std's hasher is not), which a placement rule must be.
fn weight(edge_id: &str, endpoint: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in edge_id.bytes().chain([0]).chain(endpoint.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // splitmix64 finaliser: spreads FNV's weak low bits.
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("core-{i}:7443")).collect()
    }

    #[test]
    fn order_is_a_stable_permutation() {
        let order = preference("edge-1", &nodes(5));
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(sorted, vec![0, 1, 2, 3, 4]);
        assert_eq!(preference("edge-1", &nodes(5)), order);
    }

    #[test]
    fn adding_a_node_moves_only_the_edges_that_pick_it() {
        let (before, after) = (nodes(4), nodes(5));
        let mut moved = 0;
        for e in 0..2000 {
            let id = format!("edge-{e}");
            let (a, b) = (preference(&id, &before)[0], preference(&id, &after)[0]);
            if a != b {
                assert_eq!(b, 4, "an edge moved to an old node");
                moved += 1;
            }
        }
        // About a fifth should move to the new node.
        assert!((300..=500).contains(&moved), "{moved}");
    }
}
