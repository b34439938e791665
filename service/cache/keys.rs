//! Key names: one place that knows how the cache lays its keys out.
//!
//! Keys are `<prefix>:v1:<entity>:<id>` (`dg:v1:user:42`); `v1` is the value
//! format, bumped when a cached type changes shape. Beside each key live its
//! generation, `<key>:gen`, and its fill lock, `<key>:lock`. Query results
//! are `<prefix>:v1:<family>:<hash of the query>`, fenced by the family's one
//! generation, `<prefix>:v1:<family>:gen`.
//!
//! On a Redis Cluster (`redis.mode = "cluster"`) what follows `v1:` is a hash
//! tag (`dg:v1:{user:42}`, `dg:v1:{search}:<hash>`), so a key, its generation
//! and its lock share a slot, as the scripts require; so do a family's
//! entries and its generation. Single mode keeps the untagged keys, so
//! switching modes starts with an empty cache rather than changing the keys
//! an existing deployment uses.

use super::{Entity, Family};

/// The value format: part of every key, bumped when a cached type changes.
const FORMAT: &str = "v1";

/// The key names of one namespace.
#[derive(Debug, Clone)]
pub(super) struct Keys {
    /// `<key_prefix>:v1`.
    prefix: String,
    /// Whether keys carry hash tags.
    cluster: bool,
}

impl Keys {
    pub(super) fn new(key_prefix: &str, cluster: bool) -> Self {
        Self {
            prefix: format!("{key_prefix}:{FORMAT}"),
            cluster,
        }
    }

    /// `<key_prefix>:v1`.
    pub(super) fn prefix(&self) -> &str {
        &self.prefix
    }

    pub(super) fn entity(&self, entity: Entity, id: i64) -> String {
        if self.cluster {
            format!("{}:{{{}:{id}}}", self.prefix, entity.name())
        } else {
            format!("{}:{}:{id}", self.prefix, entity.name())
        }
    }

    /// What every query key (and the generation) of `family` starts with.
    pub(super) fn query_prefix(&self, family: Family) -> String {
        if self.cluster {
            format!("{}:{{{}}}:", self.prefix, family.name())
        } else {
            format!("{}:{}:", self.prefix, family.name())
        }
    }

    /// `<prefix>:v1:<family>:<sha-256 of params, 128 bits in hex>` (the
    /// family in braces on a cluster).
    pub(super) fn query(&self, family: Family, params: &str) -> String {
        use sha2::Digest as _;
        let digest = sha2::Sha256::digest(params.as_bytes());
        let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
        format!("{}{hex}", self.query_prefix(family))
    }

    /// The one generation counter of `family`.
    pub(super) fn family_generation(&self, family: Family) -> String {
        format!("{}gen", self.query_prefix(family))
    }

    /// The pub/sub channel of invalidated entity keys (see `near`). Not a
    /// key: on a cluster, a message published on any node reaches all.
    pub(super) fn invalidation_channel(&self) -> String {
        format!("{}:invalidations", self.prefix)
    }

    /// The entity and id an entity key of this namespace names (the inverse
    /// of [`entity`](Self::entity)); `None` for any other string.
    pub(super) fn parse_entity(&self, key: &str) -> Option<(Entity, i64)> {
        let rest = key.strip_prefix(&self.prefix)?.strip_prefix(':')?;
        let rest = if self.cluster {
            rest.strip_prefix('{')?.strip_suffix('}')?
        } else {
            rest
        };
        let (name, id) = rest.split_once(':')?;
        let entity = [Entity::User, Entity::Product, Entity::Order]
            .into_iter()
            .find(|e| e.name() == name)?;
        Some((entity, id.parse().ok()?))
    }

    /// A `SCAN MATCH` pattern for every key of this namespace.
    pub(super) fn namespace_pattern(&self) -> String {
        format!("{}:*", self.prefix)
    }
}

/// The generation counter beside an entity key.
pub(super) fn generation_of(key: &str) -> String {
    format!("{key}:gen")
}

/// The cross-replica fill lock beside an entity key.
pub(super) fn lock_of(key: &str) -> String {
    format!("{key}:lock")
}

/// Whether `key` is a generation counter (entity or family), which a
/// namespace flush keeps so that in-flight fills stay fenced.
pub(super) fn is_generation(key: &str) -> bool {
    key.ends_with(":gen")
}

#[cfg(test)]
mod tests {
    use deadpool_redis::redis::cluster_routing::Slot;

    use super::*;

    fn single() -> Keys {
        Keys::new("dg", false)
    }

    fn cluster() -> Keys {
        Keys::new("dg", true)
    }

    #[test]
    fn single_mode_entity_keys_are_prefix_format_entity_and_id() {
        assert_eq!(single().entity(Entity::User, 42), "dg:v1:user:42");
        assert_eq!(single().entity(Entity::Product, 7), "dg:v1:product:7");
        assert_eq!(single().entity(Entity::Order, -1), "dg:v1:order:-1");
    }

    #[test]
    fn cluster_mode_entity_keys_hash_tag_entity_and_id() {
        assert_eq!(cluster().entity(Entity::User, 42), "dg:v1:{user:42}");
        assert_eq!(cluster().entity(Entity::Order, 3), "dg:v1:{order:3}");
    }

    #[test]
    fn generation_and_lock_keys_sit_beside_the_entity_key() {
        let key = single().entity(Entity::User, 42);
        assert_eq!(generation_of(&key), "dg:v1:user:42:gen");
        assert_eq!(lock_of(&key), "dg:v1:user:42:lock");
        let key = cluster().entity(Entity::User, 42);
        assert_eq!(generation_of(&key), "dg:v1:{user:42}:gen");
        assert_eq!(lock_of(&key), "dg:v1:{user:42}:lock");
    }

    #[test]
    fn on_a_cluster_a_key_its_generation_and_its_lock_share_a_slot() {
        for id in [1, 42, 1_000_000] {
            let key = cluster().entity(Entity::User, id);
            let slot = Slot::for_key(&key);
            assert_eq!(Slot::for_key(generation_of(&key)), slot, "{key}");
            assert_eq!(Slot::for_key(lock_of(&key)), slot, "{key}");
        }
    }

    #[test]
    fn query_key_prefixes_name_the_family_hash_tagged_on_a_cluster() {
        assert_eq!(single().query_prefix(Family::Search), "dg:v1:search:");
        assert_eq!(single().query_prefix(Family::Analytics), "dg:v1:analytics:");
        assert_eq!(cluster().query_prefix(Family::Search), "dg:v1:{search}:");
    }

    #[test]
    fn query_keys_are_the_prefix_and_128_bits_of_the_params_hash() {
        let key = single().query(Family::Search, "q=lathe");
        let hex = key.strip_prefix("dg:v1:search:").expect(&key);
        assert_eq!(hex.len(), 32);
        assert!(hex.bytes().all(|b| b.is_ascii_hexdigit()), "{hex}");
        assert_eq!(single().query(Family::Search, "q=lathe"), key, "stable");
        assert_ne!(single().query(Family::Search, "q=drill"), key);
        assert_eq!(
            cluster().query(Family::Search, "q=lathe"),
            format!("dg:v1:{{search}}:{hex}")
        );
    }

    #[test]
    fn the_family_generation_key_shares_the_family_prefix_and_slot() {
        assert_eq!(
            single().family_generation(Family::Search),
            "dg:v1:search:gen"
        );
        let generation = cluster().family_generation(Family::Search);
        assert_eq!(generation, "dg:v1:{search}:gen");
        assert_eq!(
            Slot::for_key(&generation),
            Slot::for_key(cluster().query(Family::Search, "q=lathe"))
        );
    }

    #[test]
    fn generations_are_recognised_and_values_are_not() {
        assert!(is_generation(&generation_of(
            &single().entity(Entity::User, 1)
        )));
        assert!(is_generation(&cluster().family_generation(Family::Search)));
        assert!(!is_generation(&single().entity(Entity::User, 1)));
        assert!(!is_generation(&single().query(Family::Search, "gen")));
    }

    #[test]
    fn entity_keys_parse_back_to_their_entity_and_id_and_nothing_else_does() {
        for keys in [single(), cluster()] {
            for (entity, id) in [(Entity::User, 42), (Entity::Order, -3)] {
                assert_eq!(
                    keys.parse_entity(&keys.entity(entity, id)),
                    Some((entity, id))
                );
            }
            let user = keys.entity(Entity::User, 42);
            for other in [
                generation_of(&user),
                lock_of(&user),
                keys.query(Family::Search, "q"),
                keys.family_generation(Family::Search),
                Keys::new("other", keys.cluster).entity(Entity::User, 42),
                "dg:v1:team:1".to_owned(),
                String::new(),
            ] {
                assert_eq!(keys.parse_entity(&other), None, "{other}");
            }
        }
        assert_eq!(single().invalidation_channel(), "dg:v1:invalidations");
    }

    #[test]
    fn the_namespace_pattern_matches_every_key_of_the_prefix() {
        assert_eq!(single().namespace_pattern(), "dg:v1:*");
        assert_eq!(cluster().namespace_pattern(), "dg:v1:*");
    }
}
