//! Teams and team membership: operations and outcomes. Types are in
//! `model::teams`; SQL in `store::teams`.

use super::{users::user_not_found, write::Writes};
use crate::{
    error::{Detail, Error, Result, reason},
    model::{
        Id,
        audit::Actor,
        paging::{Page, PageRequest, PageTokens},
        teams::{Membership, MembershipCursor, Team, TeamName, TeamRole},
    },
    retry, store,
};

pub fn team_not_found(id: Id) -> Error {
    Error::NotFound(
        Detail::new(reason::TEAM_NOT_FOUND, format!("team {id} does not exist"))
            .with("team_id", id),
    )
}

#[derive(Clone)]
pub struct Teams {
    writes: Writes,
    pages: PageTokens,
}

impl Teams {
    /// Teams on `writes`' pool. Nothing cached depends on teams: their
    /// writes invalidate nothing.
    pub fn new(writes: &Writes, pages: PageTokens) -> Self {
        Self {
            writes: writes.clone(),
            pages,
        }
    }

    #[tracing::instrument(skip_all, err(level = "info", Debug))]
    pub async fn create(&self, actor: &Actor, name: TeamName) -> Result<Team> {
        let team = retry::postgres(|| async {
            let mut tx = self.writes.begin(actor).await?;
            let team = store::teams::insert_team(&mut tx, &name)
                .await
                .map_err(|e| {
                    e.on_unique(
                        "teams_name_key",
                        reason::TEAM_NAME_ALREADY_EXISTS,
                        "another team has this name; names are unique regardless of case",
                    )
                })?;
            tx.commit().await?;
            Ok(team)
        })
        .await?;
        tracing::info!(team_id = %team.id, "team created");
        Ok(team)
    }

    /// The user row is locked (FOR SHARE) while the membership is inserted,
    /// so a concurrent delete cannot leave a deleted user in a team.
    #[tracing::instrument(skip_all, fields(team_id = %team_id, user_id = %user_id), err(level = "info", Debug))]
    pub async fn add_member(
        &self,
        actor: &Actor,
        team_id: Id,
        user_id: Id,
        role: TeamRole,
    ) -> Result<Membership> {
        retry::postgres(|| async {
            let mut tx = self.writes.begin(actor).await?;
            if !store::users::lock_live_user(&mut tx, user_id).await? {
                return Err(user_not_found(user_id));
            }
            let membership = store::teams::insert_membership(&mut tx, team_id, user_id, role)
                .await
                .map_err(|e| {
                    e.on_constraint(|c| match c {
                        "user_teams_pkey" => Some(Error::AlreadyExists(
                            Detail::new(
                                reason::TEAM_MEMBER_ALREADY_EXISTS,
                                format!("user {user_id} is already a member of team {team_id}; remove them first to change the role"),
                            )
                            .with("team_id", team_id)
                            .with("user_id", user_id),
                        )),
                        "user_teams_team_id_fkey" => Some(team_not_found(team_id)),
                        _ => None,
                    })
                })?;
            tx.commit().await?;
            Ok(membership)
        })
        .await
    }

    #[tracing::instrument(skip_all, fields(team_id = %team_id, user_id = %user_id), err(level = "info", Debug))]
    pub async fn remove_member(&self, actor: &Actor, team_id: Id, user_id: Id) -> Result<()> {
        retry::postgres(|| async {
            let mut tx = self.writes.begin(actor).await?;
            if store::teams::delete_membership(&mut tx, team_id, user_id).await? {
                return tx.commit().await;
            }
            Err(if !store::teams::team_exists(&mut tx, team_id).await? {
                team_not_found(team_id)
            } else {
                Error::NotFound(
                    Detail::new(
                        reason::TEAM_MEMBER_NOT_FOUND,
                        format!("user {user_id} is not a member of team {team_id}"),
                    )
                    .with("team_id", team_id)
                    .with("user_id", user_id),
                )
            })
        })
        .await
    }

    #[tracing::instrument(skip_all, fields(user_id = %user_id), err(level = "info", Debug))]
    pub async fn list_for_user(&self, user_id: Id, page: PageRequest) -> Result<Page<Membership>> {
        let query = format!("user={user_id}");
        let listing = self.pages.listing("user_teams", &query);
        let after: Option<MembershipCursor> = listing.after(&page)?;
        let items = retry::postgres(|| async {
            let mut conn = store::postgres::acquire(self.writes.db()).await?;
            if store::users::current_version(&mut conn, user_id)
                .await?
                .is_none()
            {
                return Err(user_not_found(user_id));
            }
            store::teams::memberships_of(&mut conn, user_id, after, page.size.fetch_limit()).await
        })
        .await?;
        Ok(listing.page(items, page.size, |last| -> MembershipCursor {
            (last.joined_at.timestamp_micros(), last.team.id.get())
        }))
    }
}
