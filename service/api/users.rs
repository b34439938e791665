//! `datagate.v1.UserService`.

use std::time::Duration;

use prost_types::FieldMask;

use super::{
    Answer, Call, actor, apply_mask, one_id, optional_version, paged, parse_consistency, parse_id,
    parse_ids, parse_page, parse_time_range, parsed, reply, required_version, timestamp,
};
use crate::{
    domain::{
        profiles::{Profiles, parse_addresses, parse_name, parse_preferences},
        teams::Teams,
        users::Users,
    },
    error::{Error, Violations},
    model::{
        Id,
        consistency::Consistency,
        paging::PageRequest,
        passwords::Password,
        profiles::{Address, Preferences, Profile, ProfilePatch},
        teams::{Membership, Team, TeamName, TeamRole},
        users::{
            DisplayName, Email, MAX_BATCH, NewUser, User, UserFilter, UserLookup, UserPatch,
            UserStatus, Username,
        },
    },
    proto::v1 as pb,
};

pub use pb::user_service_server::UserServiceServer;

pub struct UserApi {
    pub(crate) users: Users,
    pub(crate) teams: Teams,
    pub(crate) profiles: Profiles,
    /// The largest `max_staleness` a GetUser may ask for.
    pub(crate) max_staleness: Duration,
}

#[tonic::async_trait]
impl pb::user_service_server::UserService for UserApi {
    async fn create_user(&self, call: Call<pb::CreateUserRequest>) -> Answer<pb::User> {
        let actor = actor(&call)?;
        let new = parse_new_user(call.into_inner())?;
        let user = self.users.create(&actor, new).await?;
        reply(user)
    }

    async fn get_user(&self, call: Call<pb::GetUserRequest>) -> Answer<pb::User> {
        let (id, consistency) = parse_get_user(call.into_inner(), self.max_staleness)?;
        reply(self.users.get(id, consistency).await?)
    }

    async fn batch_get_users(
        &self,
        call: Call<pb::BatchGetUsersRequest>,
    ) -> Answer<pb::BatchGetUsersResponse> {
        let request = call.into_inner();
        let ids = parse_batch_get_users(&request)?;
        let batch = self.users.batch_get(&ids, request.skip_missing).await?;
        reply(pb::BatchGetUsersResponse {
            users: batch.users.into_iter().map(Into::into).collect(),
            missing_ids: batch.missing.into_iter().map(|id| id.get()).collect(),
        })
    }

    async fn list_users(&self, call: Call<pb::ListUsersRequest>) -> Answer<pb::ListUsersResponse> {
        let (filter, page) = parse_list_users(call.into_inner())?;
        let (users, next_page_token) = paged(self.users.list(filter, page).await?);
        reply(pb::ListUsersResponse {
            users,
            next_page_token,
        })
    }

    async fn update_user(&self, call: Call<pb::UpdateUserRequest>) -> Answer<pb::User> {
        let actor = actor(&call)?;
        let (id, version, patch) = parse_update_user(call.into_inner())?;
        let user = self.users.update(&actor, id, version, patch).await?;
        reply(user)
    }

    async fn delete_user(
        &self,
        call: Call<pb::DeleteUserRequest>,
    ) -> Answer<pb::DeleteUserResponse> {
        let actor = actor(&call)?;
        let (id, version) = parse_delete_user(call.into_inner())?;
        self.users.delete(&actor, id, version).await?;
        reply(pb::DeleteUserResponse {})
    }

    async fn verify_password(
        &self,
        call: Call<pb::VerifyPasswordRequest>,
    ) -> Answer<pb::VerifyPasswordResponse> {
        let (lookup, password) = parse_verify_password(call.into_inner())?;
        let user = self.users.verify_password(lookup, password).await?;
        reply(pb::VerifyPasswordResponse {
            valid: user.is_some(),
            user: user.map(Into::into),
        })
    }

    async fn create_team(&self, call: Call<pb::CreateTeamRequest>) -> Answer<pb::Team> {
        let actor = actor(&call)?;
        let name = parse_create_team(call.into_inner())?;
        reply(self.teams.create(&actor, name).await?)
    }

    async fn add_team_member(
        &self,
        call: Call<pb::AddTeamMemberRequest>,
    ) -> Answer<pb::TeamMembership> {
        let actor = actor(&call)?;
        let (team_id, user_id, role) = parse_add_team_member(call.into_inner())?;
        let membership = self
            .teams
            .add_member(&actor, team_id, user_id, role)
            .await?;
        reply(membership)
    }

    async fn remove_team_member(
        &self,
        call: Call<pb::RemoveTeamMemberRequest>,
    ) -> Answer<pb::RemoveTeamMemberResponse> {
        let actor = actor(&call)?;
        let (team_id, user_id) = parse_remove_team_member(call.into_inner())?;
        self.teams.remove_member(&actor, team_id, user_id).await?;
        reply(pb::RemoveTeamMemberResponse {})
    }

    async fn list_user_teams(
        &self,
        call: Call<pb::ListUserTeamsRequest>,
    ) -> Answer<pb::ListUserTeamsResponse> {
        let (user_id, page) = parse_list_user_teams(call.into_inner())?;
        let (memberships, next_page_token) = paged(self.teams.list_for_user(user_id, page).await?);
        reply(pb::ListUserTeamsResponse {
            memberships,
            next_page_token,
        })
    }

    async fn get_user_profile(
        &self,
        call: Call<pb::GetUserProfileRequest>,
    ) -> Answer<pb::UserProfile> {
        let id = parse_get_user_profile(call.into_inner())?;
        reply(self.profiles.get(id).await?)
    }

    async fn update_user_profile(
        &self,
        call: Call<pb::UpdateUserProfileRequest>,
    ) -> Answer<pb::UserProfile> {
        let (id, patch) = parse_update_user_profile(call.into_inner())?;
        reply(self.profiles.update(id, patch).await?)
    }
}

// Each RPC's request, parsed: every field violation collected, or the domain
// values the handler passes on. Public for the fuzz targets (`fuzz/`), which
// run them on arbitrary messages.

/// The id, and the consistency asked for (`max_staleness`, at most `max`).
pub fn parse_get_user(r: pb::GetUserRequest, max: Duration) -> Result<(Id, Consistency), Error> {
    let mut v = Violations::default();
    let id = parse_id(&mut v, "id", r.id);
    let consistency = v.check("max_staleness", parse_consistency(r.max_staleness, max));
    parsed!(v, id, consistency);
    Ok((id, consistency))
}

pub fn parse_batch_get_users(r: &pb::BatchGetUsersRequest) -> Result<Vec<Id>, Error> {
    parse_ids(&r.ids, MAX_BATCH)
}

pub fn parse_list_users(r: pb::ListUsersRequest) -> Result<(UserFilter, PageRequest), Error> {
    let mut v = Violations::default();
    let page = parse_page(&mut v, r.page_size, r.page_token);
    let status = v.check("status", parse_status_filter(r.status));
    let (created_after, created_before) =
        parse_time_range(&mut v, r.created_after.as_ref(), r.created_before.as_ref());
    parsed!(v, page, status);
    let filter = UserFilter {
        status,
        created_after,
        created_before,
    };
    Ok((filter, page))
}

/// The user, the version the update names, and the patch.
pub fn parse_update_user(r: pb::UpdateUserRequest) -> Result<(Id, i64, UserPatch), Error> {
    let mut v = Violations::default();
    let id = parse_id(&mut v, "id", r.id);
    required_version(&mut v, r.version, "user", "GetUser");
    let patch = parse_patch(&mut v, r.user.unwrap_or_default(), r.update_mask);
    parsed!(v, id, patch);
    Ok((id, r.version, patch))
}

/// The user and the version the delete names, if any.
pub fn parse_delete_user(r: pb::DeleteUserRequest) -> Result<(Id, Option<i64>), Error> {
    let mut v = Violations::default();
    let id = parse_id(&mut v, "id", r.id);
    let version = optional_version(&mut v, r.version, "user");
    parsed!(v, id);
    Ok((id, version))
}

pub fn parse_verify_password(
    r: pb::VerifyPasswordRequest,
) -> Result<(UserLookup, Password), Error> {
    let mut v = Violations::default();
    let lookup = match r.user {
        Some(pb::verify_password_request::User::Id(raw)) => {
            parse_id(&mut v, "id", raw).map(UserLookup::Id)
        }
        Some(pb::verify_password_request::User::Email(raw)) => {
            v.check("email", Email::parse(&raw)).map(UserLookup::Email)
        }
        None => {
            v.add("user", "set either id or email");
            None
        }
    };
    let password = v.check("password", Password::parse_candidate(r.password));
    parsed!(v, lookup, password);
    Ok((lookup, password))
}

pub fn parse_create_team(r: pb::CreateTeamRequest) -> Result<TeamName, Error> {
    let mut v = Violations::default();
    let name = v.check("name", TeamName::parse(&r.name));
    parsed!(v, name);
    Ok(name)
}

/// The team, the user and the role.
pub fn parse_add_team_member(r: pb::AddTeamMemberRequest) -> Result<(Id, Id, TeamRole), Error> {
    let mut v = Violations::default();
    let team_id = parse_id(&mut v, "team_id", r.team_id);
    let user_id = parse_id(&mut v, "user_id", r.user_id);
    let role = v.check("role", parse_role(r.role));
    parsed!(v, team_id, user_id, role);
    Ok((team_id, user_id, role))
}

/// The team and the user.
pub fn parse_remove_team_member(r: pb::RemoveTeamMemberRequest) -> Result<(Id, Id), Error> {
    let mut v = Violations::default();
    let team_id = parse_id(&mut v, "team_id", r.team_id);
    let user_id = parse_id(&mut v, "user_id", r.user_id);
    parsed!(v, team_id, user_id);
    Ok((team_id, user_id))
}

pub fn parse_list_user_teams(r: pb::ListUserTeamsRequest) -> Result<(Id, PageRequest), Error> {
    let mut v = Violations::default();
    let user_id = parse_id(&mut v, "user_id", r.user_id);
    let page = parse_page(&mut v, r.page_size, r.page_token);
    parsed!(v, user_id, page);
    Ok((user_id, page))
}

pub fn parse_get_user_profile(r: pb::GetUserProfileRequest) -> Result<Id, Error> {
    one_id("user_id", r.user_id)
}

pub fn parse_update_user_profile(
    r: pb::UpdateUserProfileRequest,
) -> Result<(Id, ProfilePatch), Error> {
    let mut v = Violations::default();
    let id = parse_id(&mut v, "user_id", r.user_id);
    let patch = parse_profile_patch(&mut v, r.profile.unwrap_or_default(), r.update_mask);
    parsed!(v, id, patch);
    Ok((id, patch))
}

pub fn parse_new_user(request: pb::CreateUserRequest) -> Result<NewUser, Error> {
    let mut v = Violations::default();
    let email = v.check("email", Email::parse(&request.email));
    let username = v.check("username", Username::parse(&request.username));
    let display_name = v.check("display_name", DisplayName::parse(&request.display_name));
    let status = v
        .check("status", parse_status_filter(request.status))
        .map(|s| s.unwrap_or(UserStatus::Active));
    let password = if request.password.is_empty() {
        Some(None)
    } else {
        v.check("password", Password::parse(request.password))
            .map(Some)
    };
    Ok(parsed!(
        v,
        NewUser {
            email,
            username,
            display_name,
            status,
            password,
        }
    ))
}

const PATCHABLE: &str = "email, username, display_name, status, password";

const PROFILE_FIELDS: &str = "given_name, family_name, preferences, addresses";

fn parse_profile_patch(
    v: &mut Violations,
    p: pb::UserProfile,
    mask: Option<FieldMask>,
) -> Option<ProfilePatch> {
    let mut patch = ProfilePatch::default();
    let mut preferences = p.preferences;
    let mut addresses = Some(p.addresses);
    let known = apply_mask(v, mask, PROFILE_FIELDS, |v, path| {
        match path {
            "given_name" => {
                patch.given_name = v.check("profile.given_name", parse_name(&p.given_name))
            }
            "family_name" => {
                patch.family_name = v.check("profile.family_name", parse_name(&p.family_name))
            }
            "preferences" => {
                let raw = preferences.take().unwrap_or_default();
                patch.preferences = Some(parse_preferences(
                    v,
                    "profile.preferences",
                    Preferences {
                        language: raw.language,
                        currency: raw.currency,
                        marketing_emails: raw.marketing_emails,
                    },
                ));
            }
            "addresses" => {
                let raw = addresses.take().unwrap_or_default();
                patch.addresses = Some(parse_addresses(
                    v,
                    "profile.addresses",
                    raw.into_iter().map(Address::from).collect(),
                ));
            }
            _ => return false,
        }
        true
    });
    known.then_some(patch)
}

impl From<pb::Address> for Address {
    fn from(a: pb::Address) -> Self {
        Self {
            label: a.label,
            line1: a.line1,
            line2: a.line2,
            city: a.city,
            region: a.region,
            postal_code: a.postal_code,
            country: a.country,
            primary: a.primary,
        }
    }
}

impl From<Profile> for pb::UserProfile {
    fn from(p: Profile) -> Self {
        Self {
            user_id: p.user_id,
            given_name: p.given_name,
            family_name: p.family_name,
            preferences: Some(pb::ProfilePreferences {
                language: p.preferences.language,
                currency: p.preferences.currency,
                marketing_emails: p.preferences.marketing_emails,
            }),
            addresses: p
                .addresses
                .into_iter()
                .map(|a| pb::Address {
                    label: a.label,
                    line1: a.line1,
                    line2: a.line2,
                    city: a.city,
                    region: a.region,
                    postal_code: a.postal_code,
                    country: a.country,
                    primary: a.primary,
                })
                .collect(),
            update_time: p.updated_at.map(timestamp),
        }
    }
}

fn parse_patch(
    v: &mut Violations,
    user: pb::UserPatch,
    mask: Option<FieldMask>,
) -> Option<UserPatch> {
    let mut patch = UserPatch::default();
    let known = apply_mask(v, mask, PATCHABLE, |v, path| {
        match path {
            "email" => patch.email = v.check("user.email", Email::parse(&user.email)),
            "username" => {
                patch.username = v.check("user.username", Username::parse(&user.username))
            }
            "display_name" => {
                patch.display_name =
                    v.check("user.display_name", DisplayName::parse(&user.display_name))
            }
            "status" => match parse_status_filter(user.status) {
                Ok(Some(status)) => patch.status = Some(status),
                Ok(None) => v.add("user.status", "must be set when `status` is in the mask"),
                Err(e) => v.add("user.status", e),
            },
            "password" => {
                patch.password = if user.password.is_empty() {
                    Some(None)
                } else {
                    v.check("user.password", Password::parse(user.password.clone()))
                        .map(Some)
                }
            }
            _ => return false,
        }
        true
    });
    known.then_some(patch)
}

/// `UNSPECIFIED` means "no status given"; unknown numbers are invalid.
fn parse_status_filter(raw: i32) -> Result<Option<UserStatus>, String> {
    match pb::UserStatus::try_from(raw) {
        Ok(pb::UserStatus::Unspecified) => Ok(None),
        Ok(pb::UserStatus::Active) => Ok(Some(UserStatus::Active)),
        Ok(pb::UserStatus::Inactive) => Ok(Some(UserStatus::Inactive)),
        Ok(pb::UserStatus::Suspended) => Ok(Some(UserStatus::Suspended)),
        Err(_) => Err(format!("unknown status {raw}")),
    }
}

fn parse_role(raw: i32) -> Result<TeamRole, String> {
    match pb::TeamRole::try_from(raw) {
        Ok(pb::TeamRole::Unspecified | pb::TeamRole::Member) => Ok(TeamRole::Member),
        Ok(pb::TeamRole::Maintainer) => Ok(TeamRole::Maintainer),
        Ok(pb::TeamRole::Owner) => Ok(TeamRole::Owner),
        Err(_) => Err(format!("unknown role {raw}")),
    }
}

impl From<User> for pb::User {
    fn from(u: User) -> Self {
        let status = match u.status {
            UserStatus::Active => pb::UserStatus::Active,
            UserStatus::Inactive => pb::UserStatus::Inactive,
            UserStatus::Suspended => pb::UserStatus::Suspended,
        };
        Self {
            id: u.id.get(),
            email: u.email,
            username: u.username,
            display_name: u.display_name,
            status: status.into(),
            has_password: u.has_password,
            create_time: Some(timestamp(u.created_at)),
            update_time: Some(timestamp(u.updated_at)),
            version: u.version,
        }
    }
}

impl From<Team> for pb::Team {
    fn from(t: Team) -> Self {
        Self {
            id: t.id.get(),
            name: t.name,
            create_time: Some(timestamp(t.created_at)),
        }
    }
}

impl From<Membership> for pb::TeamMembership {
    fn from(m: Membership) -> Self {
        let role = match m.role {
            TeamRole::Member => pb::TeamRole::Member,
            TeamRole::Maintainer => pb::TeamRole::Maintainer,
            TeamRole::Owner => pb::TeamRole::Owner,
        };
        Self {
            team: Some(m.team.into()),
            user_id: m.user_id.get(),
            role: role.into(),
            join_time: Some(timestamp(m.joined_at)),
        }
    }
}
