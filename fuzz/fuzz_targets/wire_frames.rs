//! The payload of a frame a peer sends after the handshake, as network.rs handles it: an
//! aligned copy decoded as a request (`decode_request`, then `to_raft_request`) and as a
//! response (`decode_response`, then each `to_*_response`). Entries in an append are also
//! tried with their checksums sealed, so mutated records reach the payload decoders.
//! Whatever decodes must survive the trip back to the wire unchanged.
//!
//! The frame layer itself (`len | payload | tag` in transport.rs) has no pure parsing
//! function to call: `Link::recv` reads a TCP stream, checks the length against
//! `frame_bytes_max` before allocating and the keyed tag before returning a payload.
#![no_main]

use libfuzzer_sys::fuzz_target;
use seguro_fs_fuzz::replication::wire::{self, RaftRequest, Request, Response};
use seguro_fs_fuzz::{aligned, seal_record};

/// A request converted to openraft's types goes back to the wire and decodes the same.
fn request_round_trips(r: &RaftRequest) {
    let back = match r {
        RaftRequest::Append(a) => wire::append_request(a),
        RaftRequest::Vote(v) => wire::vote_request(v),
        RaftRequest::Snapshot(s) => wire::snapshot_request(s),
        RaftRequest::Control(c) => Request::Control(c.clone()),
    };
    let bytes = wire::encode_request(&back);
    let again = wire::to_raft_request(wire::decode_request(&bytes).expect("re-encoded decodes"))
        .expect("re-encoded converts");
    match (r, &again) {
        (RaftRequest::Append(a), RaftRequest::Append(b)) => {
            assert_eq!(a.vote, b.vote);
            assert_eq!(a.prev_log_id, b.prev_log_id);
            assert_eq!(a.leader_commit, b.leader_commit);
            assert_eq!(a.entries, b.entries);
        }
        (RaftRequest::Vote(a), RaftRequest::Vote(b)) => assert_eq!(a, b),
        (RaftRequest::Snapshot(a), RaftRequest::Snapshot(b)) => assert_eq!(a, b),
        (RaftRequest::Control(a), RaftRequest::Control(b)) => assert_eq!(a, b),
        _ => panic!("request changed kind on the way back"),
    }
}

fn request(req: Request) {
    let again = wire::decode_request(&wire::encode_request(&req)).expect("re-encoded decodes");
    assert_eq!(again, req);
    let mut sealed = req.clone();
    if let Request::Append { entries, .. } = &mut sealed {
        let mut any = false;
        for e in entries.iter_mut() {
            any |= seal_record(std::sync::Arc::make_mut(e).as_mut_slice());
        }
        if any {
            if let Ok(r) = wire::to_raft_request(sealed) {
                request_round_trips(&r);
            }
        }
    }
    if let Ok(r) = wire::to_raft_request(req) {
        request_round_trips(&r);
    }
}

fn response(resp: Response) {
    let again = wire::decode_response(&wire::encode_response(&resp)).expect("re-encoded decodes");
    assert_eq!(again, resp);
    if let Ok(a) = wire::to_append_response(resp.clone()) {
        assert_eq!(wire::to_append_response(wire::append_response(&a)), Ok(a));
    }
    if let Ok(v) = wire::to_vote_response(resp.clone()) {
        assert_eq!(wire::to_vote_response(wire::vote_response(&v)), Ok(v));
    }
    if let Ok(s) = wire::to_snapshot_response(resp.clone()) {
        assert_eq!(
            wire::to_snapshot_response(wire::snapshot_response(&s)),
            Ok(s)
        );
    }
    let _ = wire::to_control_response(resp);
}

fuzz_target!(|data: &[u8]| {
    let frame = aligned(data);
    if let Ok(req) = wire::decode_request(&frame) {
        request(req);
    }
    if let Ok(resp) = wire::decode_response(&frame) {
        response(resp);
    }
});
