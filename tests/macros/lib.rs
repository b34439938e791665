//! `#[api_test]`, the attribute every integration test in `tests/api` wears
//! instead of `#[tokio::test]`.
//!
//! ```ignore
//! #[api_test]
//! async fn a_sentence_naming_the_behaviour() { ... }
//!
//! #[api_test(timeout_secs = 300, start_paused = true)]
//! async fn a_slow_one() { ... }
//! ```
//!
//! It expands to a `#[tokio::test]` (every argument but `timeout_secs` is
//! passed on to it) whose body runs inside `crate::support::frame::run`: the
//! time limit (120 s unless `timeout_secs` says otherwise;
//! `DATAGATE_TEST_TIMEOUT_SECS` overrides both) and the teardown of the
//! apps, databases and MongoDB databases the test started. An attribute,
//! rather than a macro around the body, keeps the test bodies as plain,
//! rustfmt-formatted functions.

use proc_macro::TokenStream;
use quote::quote;
use syn::{Expr, ItemFn, Meta, Token, parse_macro_input, punctuated::Punctuated};

#[proc_macro_attribute]
pub fn api_test(args: TokenStream, item: TokenStream) -> TokenStream {
    let args = parse_macro_input!(args with Punctuated::<Meta, Token![,]>::parse_terminated);
    let function = parse_macro_input!(item as ItemFn);

    let mut limit = quote! { ::core::option::Option::None };
    let mut tokio_args = Vec::new();
    for arg in args {
        match &arg {
            Meta::NameValue(nv) if nv.path.is_ident("timeout_secs") => {
                let Expr::Lit(secs) = &nv.value else {
                    return syn::Error::new_spanned(&nv.value, "timeout_secs takes a number")
                        .to_compile_error()
                        .into();
                };
                limit = quote! {
                    ::core::option::Option::Some(::std::time::Duration::from_secs(#secs))
                };
            }
            _ => tokio_args.push(arg),
        }
    }
    if function.sig.asyncness.is_none() {
        return syn::Error::new_spanned(function.sig.fn_token, "an #[api_test] is an async fn")
            .to_compile_error()
            .into();
    }

    let ItemFn {
        attrs,
        vis,
        sig,
        block,
    } = function;
    let name = &sig.ident;
    let tokio_test = if tokio_args.is_empty() {
        quote! { #[::tokio::test] }
    } else {
        quote! { #[::tokio::test(#(#tokio_args),*)] }
    };
    quote! {
        #tokio_test
        #(#attrs)*
        #vis #sig {
            crate::support::frame::run(
                ::core::concat!(::core::module_path!(), "::", ::core::stringify!(#name)),
                #limit,
                async move #block,
            )
            .await
        }
    }
    .into()
}
