//! Team membership through UserService.

use datagate::proto::v1 as pb;
use tonic::Code;

use crate::support::{TestApp, api_test, assert_error, violated_fields};

async fn create_team(app: &TestApp, name: &str) -> pb::Team {
    app.users()
        .await
        .create_team(pb::CreateTeamRequest { name: name.into() })
        .await
        .unwrap()
        .into_inner()
}

#[api_test]
async fn a_member_is_added_listed_and_removed() {
    let app = TestApp::spawn().await;
    let user = app.create_user("member@example.com", "member").await;
    let core = create_team(&app, "Core").await;
    let infra = create_team(&app, "Infra").await;
    let mut users = app.users().await;

    let added = users
        .add_team_member(pb::AddTeamMemberRequest {
            team_id: core.id,
            user_id: user.id,
            role: pb::TeamRole::Owner.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(added.team.as_ref().unwrap().name, "Core");
    assert_eq!(added.role(), pb::TeamRole::Owner);
    users
        .add_team_member(pb::AddTeamMemberRequest {
            team_id: infra.id,
            user_id: user.id,
            role: 0,
        })
        .await
        .unwrap();

    let first = users
        .list_user_teams(pb::ListUserTeamsRequest {
            user_id: user.id,
            page_size: 1,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.memberships.len(), 1);
    assert_eq!(first.memberships[0].team.as_ref().unwrap().id, core.id);
    let second = users
        .list_user_teams(pb::ListUserTeamsRequest {
            user_id: user.id,
            page_size: 1,
            page_token: first.next_page_token,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second.memberships[0].team.as_ref().unwrap().id, infra.id);
    assert_eq!(
        second.memberships[0].role(),
        pb::TeamRole::Member,
        "member is the default role"
    );
    assert!(second.next_page_token.is_empty());

    users
        .remove_team_member(pb::RemoveTeamMemberRequest {
            team_id: core.id,
            user_id: user.id,
        })
        .await
        .unwrap();
    let after = users
        .list_user_teams(pb::ListUserTeamsRequest {
            user_id: user.id,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after.memberships.len(), 1);
    assert_eq!(after.memberships[0].team.as_ref().unwrap().id, infra.id);
}

#[api_test]
async fn team_names_are_unique_regardless_of_case_and_must_not_be_blank() {
    let app = TestApp::spawn().await;
    create_team(&app, "Platform").await;
    let mut users = app.users().await;
    let status = users
        .create_team(pb::CreateTeamRequest {
            name: "PLATFORM".into(),
        })
        .await
        .unwrap_err();
    assert_error(&status, Code::AlreadyExists, "TEAM_NAME_ALREADY_EXISTS");
    let status = users
        .create_team(pb::CreateTeamRequest { name: "   ".into() })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["name"]);
}

#[api_test]
async fn membership_errors_name_what_is_missing_or_duplicated() {
    let app = TestApp::spawn().await;
    let user = app.create_user("m@example.com", "membr").await;
    let team = create_team(&app, "Ops").await;
    let mut users = app.users().await;
    let add = |team_id, user_id| pb::AddTeamMemberRequest {
        team_id,
        user_id,
        role: 0,
    };

    users.add_team_member(add(team.id, user.id)).await.unwrap();
    let status = users
        .add_team_member(add(team.id, user.id))
        .await
        .unwrap_err();
    assert_error(&status, Code::AlreadyExists, "TEAM_MEMBER_ALREADY_EXISTS");

    for (request, reason) in [
        (add(424_242, user.id), "TEAM_NOT_FOUND"),
        (add(team.id, 424_242), "USER_NOT_FOUND"),
    ] {
        let status = users.add_team_member(request).await.unwrap_err();
        assert_error(&status, Code::NotFound, reason);
    }

    let status = users
        .remove_team_member(pb::RemoveTeamMemberRequest {
            team_id: team.id,
            user_id: 424_242,
        })
        .await
        .unwrap_err();
    assert_error(&status, Code::NotFound, "TEAM_MEMBER_NOT_FOUND");

    let status = users
        .add_team_member(pb::AddTeamMemberRequest {
            team_id: 0,
            user_id: user.id,
            role: 42,
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["role", "team_id"]);
}

#[api_test]
async fn deleting_a_user_removes_their_memberships() {
    let app = TestApp::spawn().await;
    let user = app.create_user("leaver@example.com", "leaver").await;
    let team = create_team(&app, "Temp").await;
    let mut users = app.users().await;
    users
        .add_team_member(pb::AddTeamMemberRequest {
            team_id: team.id,
            user_id: user.id,
            role: 0,
        })
        .await
        .unwrap();
    users
        .delete_user(pb::DeleteUserRequest {
            id: user.id,
            version: 0,
        })
        .await
        .unwrap();

    let remaining: i64 = sqlx::query_scalar("SELECT count(*) FROM user_teams WHERE user_id = $1")
        .bind(user.id)
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(remaining, 0);
    let status = users
        .list_user_teams(pb::ListUserTeamsRequest {
            user_id: user.id,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_error(&status, Code::NotFound, "USER_NOT_FOUND");
    let status = users
        .add_team_member(pb::AddTeamMemberRequest {
            team_id: team.id,
            user_id: user.id,
            role: 0,
        })
        .await
        .unwrap_err();
    assert_error(&status, Code::NotFound, "USER_NOT_FOUND");
}
