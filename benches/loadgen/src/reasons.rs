//! Failure and loss reasons counted by name, bounded so a flood of distinct errors cannot grow
//! a summary without limit.

use std::collections::BTreeMap;

/// Distinct failure reasons kept in the summary; the rest are counted under `other`.
const MAX_REASONS: usize = 32;

/// Adds one to a reason's count, folding reasons beyond [`MAX_REASONS`] into `other`.
pub(crate) fn bump(map: &mut BTreeMap<String, u64>, key: String) {
    bump_n(map, key, 1);
}

pub(crate) fn bump_n(map: &mut BTreeMap<String, u64>, key: String, n: u64) {
    let key = if map.len() >= MAX_REASONS && !map.contains_key(&key) {
        "other".to_owned()
    } else {
        key
    };
    *map.entry(key).or_default() += n;
}
