//! Writes the seed corpus in fuzz/seeds/TARGET/: one valid encoding of each message kind
//! the targets decode, so the fuzzers start from real archives instead of searching for
//! rkyv's layout from nothing. Run from fuzz/: `cargo run --example make_seeds`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{BasicNode, CommittedLeaderId, EntryPayload, LogId, Membership, SnapshotMeta};
use openraft::{StoredMembership, Vote};
use seguro_fs_fuzz::op::{Batch, Op, Timespec};
use seguro_fs_fuzz::replication::wire::{self, ControlRequest, ControlResponse, Request, Response};
use seguro_fs_fuzz::replication::{record, Entry, TypeConfig};

fn log_id(term: u64, index: u64) -> LogId<u64> {
    LogId::new(CommittedLeaderId::new(term, 1), index)
}

fn batch() -> Batch {
    let t = Timespec { sec: 1, nsec: 2 };
    Batch {
        origin: 42,
        seq: 3,
        ops: vec![
            Op::Write {
                path: "data.mdb".into(),
                offset: 4096,
                data: vec![7; 24].into(),
            },
            Op::Truncate {
                path: "lock.mdb".into(),
                size: 8192,
            },
            Op::SetAttr {
                path: "a".into(),
                mode: Some(0o644),
                uid: None,
                gid: Some(0),
                atime: Some(t),
                mtime: None,
            },
            Op::Create {
                path: "b".into(),
                mode: 0o600,
                excl: true,
            },
            Op::Mkdir {
                path: "d".into(),
                mode: 0o755,
            },
            Op::Unlink { path: "b".into() },
            Op::Rmdir { path: "d".into() },
            Op::Rename {
                from: "x".into(),
                to: "y".into(),
                flags: 1,
            },
            Op::Link {
                from: "y".into(),
                to: "z".into(),
            },
            Op::Symlink {
                target: "y".into(),
                path: "s".into(),
            },
            Op::Digest,
        ],
    }
}

fn membership() -> Membership<u64, BasicNode> {
    let nodes = BTreeMap::from([
        (1, BasicNode::new("127.0.0.1:7001")),
        (2, BasicNode::new("127.0.0.1:7002")),
        (3, BasicNode::new("127.0.0.1:7003")),
    ]);
    Membership::new(
        vec![BTreeSet::from([1, 2]), BTreeSet::from([1, 2, 3])],
        nodes,
    )
}

fn entries() -> Vec<Entry> {
    vec![
        Entry {
            log_id: log_id(2, 5),
            payload: EntryPayload::Blank,
        },
        Entry {
            log_id: log_id(2, 6),
            payload: EntryPayload::Normal(batch()),
        },
        Entry {
            log_id: log_id(2, 7),
            payload: EntryPayload::Membership(membership()),
        },
    ]
}

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::create_dir_all(dir).expect("create the seed directory");
    std::fs::write(dir.join(name), bytes).expect("write a seed");
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");

    let dir = root.join("batch");
    write(&dir, "all_ops", &batch().encode());

    let dir = root.join("log_records");
    let mut segment = Vec::new();
    for (e, name) in entries().iter().zip(["blank", "normal", "membership"]) {
        let r = record::encode(e);
        write(&dir, &format!("record_{name}"), &r);
        segment.extend_from_slice(&r);
    }
    // A segment's tail after a crash: pre-zeroed space after the last record.
    segment.extend_from_slice(&[0; 64]);
    write(&dir, "segment", &segment);
    write(
        &dir,
        "membership_body",
        &record::membership_to_record(&membership()),
    );

    let dir = root.join("wire_frames");
    let vote = Vote::new_committed(2, 1);
    let append = AppendEntriesRequest::<TypeConfig> {
        vote,
        prev_log_id: Some(log_id(2, 4)),
        leader_commit: Some(log_id(2, 4)),
        entries: entries(),
    };
    write(
        &dir,
        "req_append",
        &wire::encode_request(&wire::append_request(&append)),
    );
    let v = VoteRequest {
        vote: Vote::new(3, 2),
        last_log_id: Some(log_id(2, 7)),
    };
    write(
        &dir,
        "req_vote",
        &wire::encode_request(&wire::vote_request(&v)),
    );
    let snap = InstallSnapshotRequest::<TypeConfig> {
        vote,
        meta: SnapshotMeta {
            last_log_id: Some(log_id(2, 7)),
            last_membership: StoredMembership::new(Some(log_id(2, 7)), membership()),
            snapshot_id: "2-7-1".into(),
        },
        offset: 0,
        data: vec![1, 2, 3, 4],
        done: false,
    };
    write(
        &dir,
        "req_snapshot",
        &wire::encode_request(&wire::snapshot_request(&snap)),
    );
    let controls = [
        ControlRequest::Digest {
            index: 9,
            wait_ms: 100,
        },
        ControlRequest::HoldElections { ms: 500 },
        ControlRequest::Campaign { after_ms: 10 },
        ControlRequest::ExportUntil { index: 9 },
        ControlRequest::Describe,
        ControlRequest::ImageOpen,
        ControlRequest::ImageRead {
            offset: 0,
            len: 4096,
        },
    ];
    for (i, c) in controls.into_iter().enumerate() {
        write(
            &dir,
            &format!("req_control_{i}"),
            &wire::encode_request(&Request::Control(c)),
        );
    }
    let responses = [
        wire::append_response(&AppendEntriesResponse::Success),
        wire::append_response(&AppendEntriesResponse::PartialSuccess(Some(log_id(2, 6)))),
        wire::append_response(&AppendEntriesResponse::Conflict),
        wire::append_response(&AppendEntriesResponse::HigherVote(Vote::new(4, 3))),
        wire::vote_response(&VoteResponse {
            vote,
            vote_granted: true,
            last_log_id: Some(log_id(2, 7)),
        }),
        wire::snapshot_response(&InstallSnapshotResponse { vote }),
        Response::Control(ControlResponse::Done),
        Response::Control(ControlResponse::Described {
            export_until: Some(9),
        }),
        Response::Control(ControlResponse::Digest {
            applied: 9,
            digest: Some([5; 32]),
            export: false,
            note: "ok".into(),
        }),
        Response::Control(ControlResponse::Image {
            index: 9,
            len: 1 << 20,
        }),
        Response::Control(ControlResponse::ImageData { data: vec![9; 16] }),
        Response::Error {
            message: "shutting down".into(),
        },
    ];
    for (i, r) in responses.iter().enumerate() {
        write(&dir, &format!("resp_{i}"), &wire::encode_response(r));
    }
    println!("seeds written under {}", root.display());
}
