//! kill -9: a distillation killed mid-run resumes to the same bits, and a server killed while
//! its log writer holds records leaves a consistent database it restarts on.

use std::process::Command;

use super::*;
use sqlx::Connection as _;

fn sha256_file(path: &std::path::Path) -> String {
    fewstep::util::sha256_hex(&std::fs::read(path).unwrap())
}

fn sigkill(child: &mut std::process::Child) {
    let killed = Command::new("kill")
        .args(["-KILL", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = child.wait().unwrap();
    assert!(!status.success(), "{status}");
}

#[test]
fn a_distill_killed_after_its_first_checkpoint_resumes_bit_identical() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
    let dir =
        std::env::temp_dir().join(format!("fewstep-test-kill-distill-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("small.toml");
    std::fs::write(
        &config,
        "prompts = 2\ngroup_size = 2\nvideo_every = 0\ngenerator_every = 2\nlog_every = 1\n\
         checkpoint_every = 1\n",
    )
    .unwrap();
    let distill = |out: &std::path::Path, extra: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_fewstep"));
        c.args([
            "distill",
            "--model",
            "tiny-shapes-teacher",
            "--student-steps",
            "2",
        ])
        .args(["--steps", "4", "--eval-prompts", "0"])
        .arg("--models-dir")
        .arg(&root)
        .arg("--config")
        .arg(&config)
        .arg("--out")
        .arg(out)
        .args(extra)
        .env("RUST_BACKTRACE", "0")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
        c
    };

    let whole = dir.join("whole");
    assert!(distill(&whole, &[]).status().unwrap().success());
    let exported = std::fs::read_dir(&whole)
        .unwrap()
        .filter_map(|e| {
            let p = e.ok()?.path();
            p.join("manifest.toml").is_file().then_some(p)
        })
        .next()
        .expect("the uninterrupted run exported a student");
    let student_file = |out: &std::path::Path| {
        out.join(exported.file_name().unwrap()).join(
            fewstep::manifest::Manifest::from_file(&exported.join("manifest.toml"))
                .unwrap()
                .section::<fewstep::families::tiny::TinySource>()
                .unwrap()
                .weights
                .clone(),
        )
    };

    let cut = dir.join("cut");
    let mut child = distill(&cut, &[]).spawn().unwrap();
    let checkpoint = cut.join("checkpoint.safetensors");
    while !checkpoint.is_file() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before its first checkpoint"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "the run finished before the kill"
    );
    sigkill(&mut child);
    assert!(
        !student_file(&cut).is_file(),
        "the killed run had already exported"
    );

    let resumed = distill(&cut, &["--resume"]).status().unwrap();
    assert!(resumed.success());
    assert_eq!(
        sha256_file(&student_file(&cut)),
        sha256_file(&student_file(&whole)),
        "the resumed run's weights differ from the uninterrupted run's"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_server_killed_while_logging_leaves_a_consistent_database_and_restarts() {
    let dir = models_dir("kill-server", |_| {});
    let db = dir.join("log.db");
    let _ = std::fs::remove_file(&db);
    let url = format!("sqlite://{}", db.display());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();

    let mut server = spawn_binary_server(&dir, &url);
    let addr = server.addr.clone();
    // Answered requests whose records the writer is still storing when the kill lands.
    let answered = rt.block_on(async {
        let client = reqwest::Client::new();
        let tasks: Vec<_> = (0..16u64)
            .map(|seed| {
                let (client, url) = (client.clone(), format!("http://{addr}/generate"));
                tokio::spawn(async move {
                    let body = json!({"prompt": "a red circle", "seed": seed, "steps": 1});
                    let r = client.post(url).json(&body).send().await.unwrap();
                    r.status().as_u16()
                })
            })
            .collect();
        let mut ok = 0;
        for t in tasks {
            ok += usize::from(t.await.unwrap() == 200);
        }
        ok
    });
    sigkill(&mut server.child);
    let _ = server.log.join();
    assert_eq!(answered, 16);

    let logged = rt.block_on(async {
        let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
        let check: String = sqlx::query_scalar("PRAGMA integrity_check")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(check, "ok");
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM generations")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        conn.close().await.unwrap();
        n
    });
    assert!((0..=16).contains(&logged), "{logged}");

    // The server starts again on the same database, serves and logs.
    let mut again = spawn_binary_server(&dir, &url);
    let addr = again.addr.clone();
    rt.block_on(async {
        let r = reqwest::Client::new()
            .post(format!("http://{addr}/generate"))
            .json(&json!({"prompt": "a blue square", "steps": 1}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    });
    let term = Command::new("kill")
        .args(["-TERM", &again.child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    assert!(again.child.wait().unwrap().success());
    let _ = again.log.join();
    let after = rt.block_on(async {
        let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM generations")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        n
    });
    assert_eq!(after, logged + 1, "the restarted server logs again");
    std::fs::remove_dir_all(&dir).ok();
}
