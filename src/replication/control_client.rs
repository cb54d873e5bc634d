//! The client side of control requests: an authenticated link to one member carrying one
//! [`ControlRequest`] at a time (pre-vote, digests, holds, ship state, `restore`'s image
//! chunks). Used by `control.rs`, `elections.rs` and `restore.rs`; the serving side is
//! `control.rs`'s `ControlServer`.

use super::net_config::NetConfig;
use super::transport::Link;
use super::wire::{self, ControlRequest, ControlResponse, Request};

/// An authenticated link to one member for a series of control requests.
pub struct Session {
    link: Link,
    addr: String,
}

impl Session {
    pub async fn open(net: &NetConfig, addr: &str) -> Result<Session, String> {
        let key = net
            .key
            .as_ref()
            .ok_or("this node is standalone: it has no cluster key and no peers")?;
        let sock = tokio::net::lookup_host(addr)
            .await
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| format!("cannot resolve {addr}"))?;
        let link = Link::connect(sock, net.bind_ip, key, net.my_id, net.limits)
            .await
            .map_err(|e| format!("{addr}: {e}"))?;
        Ok(Session {
            link,
            addr: addr.to_string(),
        })
    }

    pub async fn call(
        &mut self,
        req: ControlRequest,
        ttl_ms: u64,
    ) -> Result<ControlResponse, String> {
        let addr = &self.addr;
        self.link
            .send(&wire::encode_request(&Request::Control(req)))
            .await
            .map_err(|e| format!("{addr}: {e}"))?;
        let bytes = self
            .link
            .recv(ttl_ms)
            .await
            .map_err(|e| format!("{addr}: {e}"))?;
        let resp = wire::decode_response(&bytes).map_err(|e| format!("{addr}: {e}"))?;
        wire::to_control_response(resp).map_err(|e| format!("{addr}: {e}"))
    }
}

/// Send one control request to the member at `addr` over a fresh link.
pub async fn call(
    net: &NetConfig,
    addr: &str,
    req: ControlRequest,
    ttl_ms: u64,
) -> Result<ControlResponse, String> {
    Session::open(net, addr).await?.call(req, ttl_ms).await
}
