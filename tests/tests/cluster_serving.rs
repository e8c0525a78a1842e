//! A real `switchyard up` cluster serving `switchyard generate --endpoint` clients: concurrent
//! streams, bad inputs with clear statuses, and a worker killed mid-request.
mod common;
use common::*;
use std::process::Command;

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

#[test]
fn cluster_serving_concurrent_streams_match_local_generation() {
    let model = fixture("mixtral");
    let cl = Cluster::up(&model, 2, None);
    let prompts = ["1,2,3,4,5", "7,8,9", "11,12,13,14,15,16,17", "20,21", "30,31,32,33"];
    // Reference: the same prompts generated in this process (no cluster).
    let want: Vec<String> = prompts
        .iter()
        .map(|p| {
            let o = Command::new(switchyard_tests::switchyard_bin())
                .args(["generate", "--model"])
                .arg(&model)
                .args(["--prompt-ids", p, "--max-tokens", "12"])
                .output()
                .expect("local generate");
            ids_line(&o).unwrap_or_else(|| panic!("local: {}", stderr(&o)))
        })
        .collect();
    let ep = cl.endpoint();
    let handles: Vec<_> = prompts
        .iter()
        .map(|p| {
            let ep = ep.clone();
            let p = p.to_string();
            std::thread::spawn(move || generate_at(&ep, &["--prompt-ids", &p, "--max-tokens", "12"]))
        })
        .collect();
    for (h, w) in handles.into_iter().zip(want) {
        let o = h.join().expect("client");
        assert!(o.status.success(), "{}", stderr(&o));
        assert_eq!(ids_line(&o).as_deref(), Some(w.as_str()));
    }
    // Text prompts go through the tokenizer.
    let o = cl.generate(&["--prompt", "Switchyard routes tokens", "--max-tokens", "4"]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn cluster_serving_bad_inputs_get_clear_statuses() {
    let cl = Cluster::up(&fixture("qwen3_moe"), 2, None);
    let cases: [(&[&str], &str); 5] = [
        (&["--prompt-ids", "1,999999,3", "--max-tokens", "4"], "out of range"),
        (&["--prompt-ids", "1,2,3", "--max-tokens", "0"], "max_tokens"),
        (&["--prompt-ids", "1,2,3", "--max-tokens", "4000000000"], "exceeds the context"),
        (&["--prompt", "", "--max-tokens", "4"], "empty prompt"),
        (&["--prompt-ids", "1,2", "--max-tokens", "2", "--temperature=-1"], "temperature"),
    ];
    for (args, want) in cases {
        let o = cl.generate(args);
        let e = stderr(&o);
        assert!(!o.status.success(), "{args:?} accepted");
        assert!(e.contains("InvalidArgument") && e.contains(want), "{args:?}: {e}");
    }
    // The cluster still serves after all that.
    let o = cl.generate(&["--prompt-ids", "1,2,3", "--max-tokens", "3"]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn cluster_serving_a_killed_workers_requests_continue_on_the_survivor() {
    let model = fixture("mixtral");
    let cl = Cluster::up(&model, 2, None);
    assert_eq!(cl.worker_pids.len(), 2);
    let ep = cl.endpoint();
    let prompts: Vec<String> = (0..4).map(|i| format!("{},{},{}", i + 1, i + 2, i + 3)).collect();
    let want: Vec<String> = prompts.iter().map(|p| local_ids(&model, p, 300)).collect();
    // Long requests spread over both ranks (least outstanding tokens alternates them). The client
    // does not retry: whatever completes, the coordinator carried over.
    let handles: Vec<_> = prompts
        .iter()
        .map(|p| {
            let (ep, p) = (ep.clone(), p.clone());
            std::thread::spawn(move || generate_at(&ep, &["--prompt-ids", &p, "--max-tokens", "300", "--retries", "0"]))
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(150));
    let _ = Command::new("kill").args(["-9", &cl.worker_pids[1].to_string()]).status();
    for (h, w) in handles.into_iter().zip(&want) {
        let o = h.join().expect("client");
        assert!(o.status.success(), "a request of the killed worker was lost: {}", stderr(&o));
        assert_eq!(ids_line(&o).as_deref(), Some(w.as_str()), "tokens changed when the request moved ranks");
    }
    // New requests still work on the survivor.
    let o = cl.generate(&["--prompt-ids", "5,6,7", "--max-tokens", "3"]);
    assert!(o.status.success(), "{}", stderr(&o));
}
