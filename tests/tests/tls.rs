//! gRPC over TLS: coordinator and workers serve with a certificate signed by a test CA (made with
//! the `openssl` CLI), every client verifies it; plaintext or another CA is refused.
mod common;
use common::*;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

fn openssl(dir: &Path, args: &[&str]) {
    let o = Command::new("openssl").current_dir(dir).args(args).output().expect("openssl (Debian package openssl)");
    assert!(o.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&o.stderr));
}

/// `ca.pem`, `server.pem` / `server.key` (for 127.0.0.1 and localhost), and `other-ca.pem`.
fn make_pki(dir: &Path) {
    for ca in ["ca", "other-ca"] {
        openssl(dir, &["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", &format!("/CN={ca}"),
            "-keyout", &format!("{ca}.key"), "-out", &format!("{ca}.pem")]);
    }
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n").expect("ext");
    openssl(dir, &["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=switchyard", "-keyout", "server.key", "-out", "server.csr"]);
    openssl(dir, &["x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2",
        "-extfile", "san.ext", "-out", "server.pem"]);
}

#[test]
fn every_grpc_hop_speaks_tls_and_plaintext_or_a_foreign_ca_is_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    let d = tmp.path();
    make_pki(d);
    let p = |f: &str| d.join(f).display().to_string();
    let (cert, key, ca) = (p("server.pem"), p("server.key"), p("ca.pem"));
    let model = fixture("mixtral");
    let c = Proc::spawn(&[
        "--tls-ca", &ca, "coordinator", "--model", model.to_str().expect("path"), "--workers", "2", "--listen", "127.0.0.1:0",
        "--tls-cert", &cert, "--tls-key", &key,
    ]);
    let addr = c.wait_line("listening on ", Duration::from_secs(60)).trim().trim_start_matches("listening on ").to_string();
    let _w: Vec<Proc> = (0..2)
        .map(|_| Proc::spawn(&["--tls-ca", &ca, "worker", "--coordinator", &addr, "--tls-cert", &cert, "--tls-key", &key]))
        .collect();
    c.wait_line("generation 1 serving", Duration::from_secs(60));
    let want = local_ids(&model, "2,4,6", 10);
    let o = switchyard(&["--tls-ca", &ca, "generate", "--endpoint", &addr, "--prompt-ids", "2,4,6", "--max-tokens", "10"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(ids_line(&o).as_deref(), Some(want.as_str()));
    // Plaintext against the TLS server, and a CA that did not sign it: refused, clearly.
    for (extra, why) in [(vec![], "--tls-ca"), (vec!["--tls-ca", p("other-ca.pem").as_str()], "certificate")] {
        let mut args: Vec<&str> = extra.clone();
        args.extend(["generate", "--endpoint", &addr, "--prompt-ids", "2,4,6", "--max-tokens", "2", "--retries", "0"]);
        let o = switchyard(&args);
        assert!(!o.status.success(), "{extra:?} was accepted");
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains(why), "{extra:?}: {e}");
    }
    // A certificate without its key is a usage error before anything starts.
    let o = switchyard(&["coordinator", "--model", model.to_str().expect("path"), "--tls-cert", &cert]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("--tls-key"));
}
