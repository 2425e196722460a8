//! Wire fidelity: envelope, errors in the reason phrase and body, 400 with
//! `errors`, 401 and 501, tokens and tickets with CSRF, Perl-style typing.

mod common;

use common::{PASSWORD, TOKEN, default_sim, raw, raw_get};
use serde_json::Value;

#[tokio::test]
async fn answers_in_the_data_envelope_with_proxmox_headers() {
    let s = default_sim().await;
    let resp = s
        .http
        .get(s.url("/version"))
        .header("Authorization", format!("PVEAPIToken={TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.headers()["content-type"],
        "application/json;charset=UTF-8"
    );
    assert_eq!(resp.headers()["server"], "pve-api-daemon/3.0");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["data"]["release"], "9.1");
    assert!(body["data"]["repoid"].as_str().unwrap().len() >= 8);
}

#[tokio::test]
async fn missing_or_bad_credentials_are_401_with_an_empty_body() {
    let s = default_sim().await;
    let (status, body) = raw(s.handle.addr, &raw_get("/version", None)).await;
    assert_eq!(status, "HTTP/1.1 401 No ticket");
    assert!(body.is_empty(), "{body}");
    let (status, _) = raw(
        s.handle.addr,
        &raw_get("/version", Some("PVEAPIToken=root@pam!test=wrong")),
    )
    .await;
    assert_eq!(status, "HTTP/1.1 401 authentication failure");
    let (status, _) = raw(
        s.handle.addr,
        &raw_get("/version", Some(&format!("PVEAPIToken={TOKEN}"))),
    )
    .await;
    assert_eq!(status, "HTTP/1.1 200 OK");
}

#[tokio::test]
async fn unknown_paths_and_methods_are_501() {
    let s = default_sim().await;
    let auth = format!("PVEAPIToken={TOKEN}");
    let (status, body) = raw(
        s.handle.addr,
        &raw_get("/nodes/pve/frobnicate", Some(&auth)),
    )
    .await;
    assert_eq!(
        status,
        "HTTP/1.1 501 Method 'GET /nodes/pve/frobnicate' not implemented"
    );
    assert!(body.contains("not implemented\\n"), "{body}");
    let r = s
        .send(s.http.patch(s.url("/nodes")).header("Authorization", &auth))
        .await;
    assert_eq!(r.status, 501);
}

#[tokio::test]
async fn bad_parameters_are_400_with_an_errors_map() {
    let s = default_sim().await;
    let r = s
        .post(
            "/nodes/pve/qemu",
            &[
                ("vmid", "abc"),
                ("cores", "0"),
                ("bogus", "1"),
                ("onboot", "true"),
            ],
        )
        .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.body["message"], "Parameter verification failed.\n");
    let errors = &r.body["errors"];
    assert_eq!(errors["vmid"], "type check ('integer') failed - got 'abc'");
    assert_eq!(errors["cores"], "value must have a minimum value of 1");
    assert_eq!(
        errors["onboot"],
        "type check ('boolean') failed - got 'true'"
    );
    assert_eq!(
        errors["bogus"],
        "property is not defined in schema and the schema does not allow additional properties"
    );
    let r = s.post("/nodes/pve/qemu/100/clone", &[]).await;
    assert_eq!(
        r.body["errors"]["newid"],
        "property is missing and it is not optional"
    );
}

#[tokio::test]
async fn a_missing_vm_is_500_with_the_message_in_reason_and_body() {
    let s = default_sim().await;
    let auth = format!("PVEAPIToken={TOKEN}");
    let (status, body) = raw(
        s.handle.addr,
        &raw_get("/nodes/pve/qemu/4242/config", Some(&auth)),
    )
    .await;
    assert_eq!(
        status,
        "HTTP/1.1 500 Configuration file 'nodes/pve/qemu-server/4242.conf' does not exist"
    );
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["data"], Value::Null);
    assert_eq!(
        body["message"],
        "Configuration file 'nodes/pve/qemu-server/4242.conf' does not exist\n"
    );
}

#[tokio::test]
async fn tickets_work_with_a_cookie_and_need_csrf_on_writes() {
    let s = default_sim().await;
    let r = s
        .send(
            s.http
                .post(s.url("/access/ticket"))
                .form(&[("username", "root@pam"), ("password", "nope")]),
        )
        .await;
    assert_eq!(r.status, 401);
    assert_eq!(r.body["message"], "authentication failure\n");
    let r = s
        .send(
            s.http
                .post(s.url("/access/ticket"))
                .form(&[("username", "root@pam"), ("password", PASSWORD)]),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.raw);
    let ticket = r.data()["ticket"].as_str().unwrap().to_owned();
    let csrf = r.data()["CSRFPreventionToken"].as_str().unwrap().to_owned();
    assert!(ticket.starts_with("PVE:root@pam:"), "{ticket}");
    assert!(r.data()["cap"].is_object());
    let cookie = format!("PVEAuthCookie={ticket}");
    let r = s
        .send(s.http.get(s.url("/nodes")).header("Cookie", &cookie))
        .await;
    assert_eq!(r.status, 200);
    let form = [("vmid", "150"), ("memory", "512")];
    let r = s
        .send(
            s.http
                .post(s.url("/nodes/pve/qemu"))
                .header("Cookie", &cookie)
                .form(&form),
        )
        .await;
    assert_eq!(r.status, 401, "a write without CSRF token");
    let r = s
        .send(
            s.http
                .post(s.url("/nodes/pve/qemu"))
                .header("Cookie", &cookie)
                .header("CSRFPreventionToken", &csrf)
                .form(&form),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.raw);
    // Renewal: the ticket as password.
    let r = s
        .send(
            s.http
                .post(s.url("/access/ticket"))
                .form(&[("username", "root@pam"), ("password", ticket.as_str())]),
        )
        .await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn json_is_typed_the_perl_way() {
    let s = default_sim().await;
    let r = s.get("/cluster/nextid").await;
    assert_eq!(r.data(), &Value::String("100".into()), "nextid is a string");
    s.create_vm(100, &[("onboot", "1"), ("cpulimit", "4"), ("agent", "1")])
        .await;
    let c = s.config(100).await;
    assert_eq!(c["memory"], "2048", "memory is a property string since 8.1");
    assert_eq!(c["cores"], 2);
    assert_eq!(c["onboot"], 1);
    assert_eq!(c["cpulimit"], "4", "number keys read back as strings");
    assert_eq!(c["agent"], "1");
    assert_eq!(c["digest"].as_str().unwrap().len(), 40);
    let r = s.get("/cluster/resources?type=vm").await;
    let vm = &r.data()[0];
    assert_eq!(vm["vmid"], 100);
    assert_eq!(vm["template"], 0);
    assert_eq!(vm["id"], "qemu/100");
    let r = s.get("/cluster/nextid?vmid=100").await;
    assert_eq!(r.status, 400);
    assert_eq!(r.body["errors"]["vmid"], "VM 100 already exists");
    let r = s.get("/cluster/nextid?vmid=105").await;
    assert_eq!(r.data(), "105");
}

#[tokio::test]
async fn body_on_get_is_refused_and_json_bodies_are_accepted() {
    let s = default_sim().await;
    let auth = format!("PVEAPIToken={TOKEN}");
    let r = s
        .send(
            s.http
                .get(s.url("/nodes"))
                .header("Authorization", &auth)
                .body("x=1"),
        )
        .await;
    assert_eq!(r.status, 501);
    let r = s
        .send(
            s.http
                .post(s.url("/nodes/pve/qemu"))
                .header("Authorization", &auth)
                .json(&serde_json::json!({"vmid": 120, "memory": "1024", "onboot": true})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.raw);
}

#[tokio::test]
async fn path_parameters_conflicting_with_the_body_are_refused() {
    let s = default_sim().await;
    s.create_vm(100, &[]).await;
    let r = s
        .put(
            "/nodes/pve/qemu/100/config",
            &[("vmid", "101"), ("cores", "3")],
        )
        .await;
    assert_eq!(r.status, 400);
    assert_eq!(
        r.body["errors"]["vmid"],
        "duplicate parameter (already defined in URI) with conflicting values!"
    );
}
