//! Request parts and test data several modules build.

use datagate::proto::v1 as pb;
use prost_types::FieldMask;

/// A unique email and username for one test's users.
pub fn unique(prefix: &str) -> (String, String) {
    let tag = &uuid::Uuid::new_v4().simple().to_string()[..10];
    (
        format!("{prefix}-{tag}@example.com"),
        format!("{prefix}_{tag}"),
    )
}

/// An update mask of `paths`.
pub fn mask(paths: &[&str]) -> Option<FieldMask> {
    Some(FieldMask {
        paths: paths.iter().map(|p| (*p).to_owned()).collect(),
    })
}

/// An UpdateUser of `user`'s display name, at its current version.
pub fn rename(user: &pb::User, name: &str) -> pb::UpdateUserRequest {
    pb::UpdateUserRequest {
        id: user.id,
        version: user.version,
        user: Some(pb::UserPatch {
            display_name: name.into(),
            ..Default::default()
        }),
        update_mask: mask(&["display_name"]),
    }
}
