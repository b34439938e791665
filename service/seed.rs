//! Demo data for `make run`: a few users and a team, inserted through the
//! domain layer so they obey every rule. Running it again changes nothing.

use secrecy::SecretString;
use sqlx::PgPool;

use crate::{
    cache::Cache,
    domain::{passwords::PasswordHasher, teams::Teams, users::Users, write::Writes},
    error::Error,
    model::{
        audit::Actor,
        paging::PageTokens,
        passwords::Password,
        teams::{TeamName, TeamRole},
        users::{DisplayName, Email, NewUser, UserStatus, Username},
    },
};

const DEMO_USERS: &[(&str, &str, &str)] = &[
    ("ada@example.com", "ada", "Ada Lovelace"),
    ("grace@example.com", "grace", "Grace Hopper"),
    ("edsger@example.com", "edsger", "Edsger Dijkstra"),
];

pub async fn demo(db: &PgPool, cache: Cache) -> anyhow::Result<()> {
    crate::store::postgres::migrate_up(db).await?;
    // Demo inserts create no page tokens; any key will do.
    let pages = PageTokens::new(&SecretString::from("seed".repeat(8)));
    let writes = Writes::new(db.clone(), cache);
    let users = Users::new(&writes, pages.clone(), PasswordHasher::for_this_machine());
    let teams = Teams::new(&writes, pages);

    let mut created = Vec::new();
    let actor = Actor::system("seed");
    for (email, username, name) in DEMO_USERS {
        let new = NewUser {
            email: Email::parse(email).map_err(anyhow::Error::msg)?,
            username: Username::parse(username).map_err(anyhow::Error::msg)?,
            display_name: DisplayName::parse(name).map_err(anyhow::Error::msg)?,
            status: UserStatus::Active,
            password: Some(
                Password::parse("correct horse battery".into()).map_err(anyhow::Error::msg)?,
            ),
        };
        match users.create(&actor, new).await {
            Ok(user) => created.push(user.id),
            Err(Error::AlreadyExists(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    if let [first, rest @ ..] = created.as_slice() {
        let team = teams
            .create(
                &actor,
                TeamName::parse("Analytical Engines").map_err(anyhow::Error::msg)?,
            )
            .await?;
        teams
            .add_member(&actor, team.id, *first, TeamRole::Owner)
            .await?;
        for id in rest {
            teams
                .add_member(&actor, team.id, *id, TeamRole::Member)
                .await?;
        }
    }
    println!("demo data: {} new users", created.len());
    Ok(())
}
