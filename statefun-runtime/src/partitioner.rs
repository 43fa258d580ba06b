//! Address -> partition: which partition owns an address.
//!
//! Why it exists: a partition owns its addresses' state and mailboxes, so every message
//! must reach the one partition that owns its target. The function is part of the
//! on-disk contract (state is stored per partition), so it is fixed and documented:
//!
//! `partition = (murmur2(id as UTF-8 bytes, seed 0x9747b28c) & 0x7fffffff) % partitions`
//!
//! This is exactly Apache Kafka's default partitioner for keyed records. Only the *id* is
//! hashed (as StateFun keys by id), so functions of different types that share an id
//! scheme (cart and loyalty keyed by customer) share a partition, and a Kafka topic keyed
//! by the id with the same partition count lines up record-for-record with the runtime's
//! partitions. Changing the partition count of an existing deployment moves addresses
//! between partitions and needs a state migration.

/// Index of a partition, `0..partitions`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct PartitionId(pub u32);

impl std::fmt::Display for PartitionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "p{}", self.0)
    }
}

/// The partition that owns address id `id` among `partitions` partitions.
///
/// # Panics
/// If `partitions` is zero.
pub fn partition_for(id: &str, partitions: u32) -> PartitionId {
    assert!(partitions > 0, "partition count must be positive");
    let h = murmur2::murmur2(id.as_bytes(), murmur2::KAFKA_SEED) & 0x7fff_ffff;
    PartitionId(h % partitions)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Reference values of Kafka's `Utils.murmur2` (as signed Java ints).
    #[test]
    fn hash_matches_kafkas_murmur2_reference_values() {
        let cases: [(&str, i32); 5] = [
            ("21", -973932308),
            ("foobar", -790332482),
            ("a-little-bit-long-string", -985981536),
            ("a-little-bit-longer-string", -1486304829),
            ("lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
        ];
        for (key, expected) in cases {
            assert_eq!(
                murmur2::murmur2(key.as_bytes(), murmur2::KAFKA_SEED) as i32,
                expected,
                "{key}"
            );
        }
    }

    #[test]
    fn known_ids_land_on_known_partitions() {
        // Kafka: toPositive(-973932308) % 4 == (0xC5F2_0A6C & 0x7fffffff) % 4.
        let expected = ((-973932308i32 as u32) & 0x7fff_ffff) % 4;
        assert_eq!(partition_for("21", 4), PartitionId(expected));
    }

    proptest! {
        #[test]
        fn partition_is_in_range_and_stable(id in ".{1,64}", n in 1u32..4096) {
            let p = partition_for(&id, n);
            prop_assert!(p.0 < n);
            prop_assert_eq!(p, partition_for(&id, n));
            prop_assert_eq!(p, partition_for(&id.clone(), n));
        }

        #[test]
        fn partitions_are_roughly_balanced(seed in any::<u64>()) {
            let n = 8u32;
            let mut counts = [0u32; 8];
            for i in 0..8000u64 {
                counts[partition_for(&format!("id-{}", seed.wrapping_add(i)), n).0 as usize] += 1;
            }
            // 1000 expected per partition; murmur2 is far inside +-30%.
            prop_assert!(counts.iter().all(|&c| (700..1300).contains(&c)), "{counts:?}");
        }
    }
}
