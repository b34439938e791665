//! The authorization matrix (`datagate::startup::RPC_ROLES`): every method
//! the protos declare has a line, and every role gets exactly what its line
//! says, PERMISSION_DENIED naming the role for the rest, before any handler
//! runs.

use std::collections::BTreeSet;

use datagate::{auth::Role, startup::RPC_ROLES};
use prost::Message as _;
use tonic::{Code, Request, Status, codegen::http::uri::PathAndQuery, transport::Channel};
use tonic_types::StatusExt as _;

use crate::support::{TestApp, api_test, assert_error};

/// Every method of the datagate services, as `/package.Service/Method`,
/// from the descriptor set reflection serves.
fn declared_methods() -> BTreeSet<String> {
    let set = prost_types::FileDescriptorSet::decode(datagate::proto::FILE_DESCRIPTOR_SET)
        .expect("the descriptor set decodes");
    set.file
        .iter()
        .filter(|file| file.package().starts_with("datagate."))
        .flat_map(|file| {
            file.service.iter().flat_map(move |service| {
                service.method.iter().map(move |method| {
                    format!("/{}.{}/{}", file.package(), service.name(), method.name())
                })
            })
        })
        .collect()
}

#[test]
fn every_declared_method_has_exactly_one_line_in_the_table() {
    let declared = declared_methods();
    assert!(declared.len() >= 30, "the protos declare {declared:?}");
    let listed: Vec<&str> = RPC_ROLES.iter().map(|(path, _)| *path).collect();
    let unique: BTreeSet<String> = listed.iter().map(|p| (*p).to_owned()).collect();
    assert_eq!(unique.len(), listed.len(), "a method listed twice");
    let missing: Vec<_> = declared.difference(&unique).collect();
    let unknown: Vec<_> = unique.difference(&declared).collect();
    assert!(missing.is_empty(), "methods without a role: {missing:?}");
    assert!(
        unknown.is_empty(),
        "lines for no declared method: {unknown:?}"
    );
}

#[test]
fn readers_get_no_write_and_writers_no_admin_rpc() {
    // The table itself: what a writer needs is a change; admin is exactly
    // AdminService.
    for (path, role) in RPC_ROLES {
        let admin_service = path.starts_with("/datagate.v1.AdminService/");
        assert_eq!(admin_service, *role == Role::Admin, "{path}");
        let method = path.rsplit('/').next().unwrap();
        let reads = ["Get", "BatchGet", "List", "Search"]
            .iter()
            .any(|verb| method.starts_with(verb));
        if !admin_service {
            let expected = if reads { Role::Reader } else { Role::Writer };
            assert_eq!(*role, expected, "{path}");
        }
    }
}

/// Calls `path` with an empty request (every field at its default, a valid
/// encoding of any message) as `token`; the response, whatever its type,
/// decodes as `()`.
async fn call(channel: &Channel, path: &'static str, token: &str) -> Result<(), Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.expect("the channel is ready");
    let mut request = Request::new(());
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ascii"),
    );
    grpc.unary(
        request,
        PathAndQuery::from_static(path),
        tonic_prost::ProstCodec::<(), ()>::default(),
    )
    .await
    .map(|_| ())
}

#[api_test]
async fn each_role_is_refused_exactly_the_rpcs_above_it() {
    let app = TestApp::spawn().await;
    let channel = app.channel().await;
    let tokens = [
        (Role::Reader, &app.reader_token),
        (Role::Writer, &app.writer_token),
        (Role::Admin, &app.token),
    ];
    let mut checked = 0;
    for (path, required) in RPC_ROLES {
        for (role, token) in tokens {
            let outcome = call(&channel, path, token).await;
            if role >= *required {
                // Authorized: the handler answers (an empty request is
                // usually invalid or not found), never an auth refusal.
                if let Err(status) = &outcome {
                    assert!(
                        !matches!(
                            status.code(),
                            Code::PermissionDenied | Code::Unauthenticated
                        ),
                        "{role} on {path}: {status:?}"
                    );
                }
            } else {
                let status = outcome.expect_err(path);
                assert_error(&status, Code::PermissionDenied, required.required_reason());
                assert!(
                    status.message().contains(required.as_str()) && status.message().contains(path),
                    "the message names the role and method: {status:?}"
                );
                let info = status.get_error_details().error_info().cloned().unwrap();
                assert_eq!(
                    info.metadata.get("role").map(String::as_str),
                    Some(required.as_str())
                );
            }
            checked += 1;
        }
    }
    assert_eq!(checked, RPC_ROLES.len() * 3);
}

#[api_test]
async fn a_caller_without_a_known_role_is_refused_every_rpc() {
    let (token, entry) = datagate::auth::new_token("no-roles", &[]).unwrap();
    let app =
        TestApp::spawn_with(|settings| settings.auth.tokens.push(entry.parse().unwrap())).await;
    let channel = app.channel().await;
    for (path, required) in RPC_ROLES {
        let status = call(&channel, path, &token).await.expect_err(path);
        assert_error(&status, Code::PermissionDenied, required.required_reason());
    }
}

#[api_test]
async fn a_method_the_table_does_not_list_is_refused_even_to_admins() {
    let app = TestApp::spawn().await;
    let status = call(
        &app.channel().await,
        "/datagate.v1.UserService/DropEverything",
        &app.token,
    )
    .await
    .unwrap_err();
    assert_error(&status, Code::PermissionDenied, "METHOD_NOT_AUTHORIZED");
}
