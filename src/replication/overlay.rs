//! The pending overlay: data ops (writes, truncates) the leader has accepted but not yet
//! applied to `tree/`. Shared by the file system (which adds pieces as it accepts ops, and
//! reads through them) and the state machine (which drops them as it applies). READ and GETATTR see the tree *through* the overlay, so a reader
//! never observes a gap between "WRITE answered" and "entry applied".
//!
//! Pieces are kept per inode in the order they were accepted, tagged with the batch seq
//! they travel in; applying batch `s` drops every piece with seq ≤ `s` (batches apply in
//! seq order). The caller holds one lock across "read tree + merge" and across "apply to
//! tree + drop", so the two views never disagree.

use std::collections::HashMap;
use std::sync::Arc;

#[derive(Debug, Clone)]
pub enum PieceKind {
    Write { offset: u64, data: Arc<[u8]> },
    Truncate { size: u64 },
}

#[derive(Debug, Clone)]
pub struct Piece {
    pub seq: u64,
    pub kind: PieceKind,
}

#[derive(Debug, Default)]
pub struct Overlay {
    files: HashMap<u64, Vec<Piece>>,
    bytes: usize,
}

/// The file size after `pieces` are applied to a file of `base` bytes.
pub fn size_after(base: u64, pieces: &[Piece]) -> u64 {
    pieces.iter().fold(base, |size, p| match &p.kind {
        PieceKind::Write { offset, data } => size.max(offset + data.len() as u64),
        PieceKind::Truncate { size: t } => *t,
    })
}

/// Bytes `[offset, offset+len)` of the file as the overlay sees it. `base` holds the tree's
/// bytes from `offset` (as many as the tree file has, possibly fewer than `len`),
/// `base_size` is the tree file's size. The result is never short inside the file size.
pub fn merge_read(
    base: &[u8],
    base_size: u64,
    pieces: &[Piece],
    offset: u64,
    len: usize,
) -> Vec<u8> {
    let size = size_after(base_size, pieces);
    let n = size.saturating_sub(offset).min(len as u64) as usize;
    let mut out = vec![0u8; n];
    let from_base = base.len().min(n);
    out[..from_base].copy_from_slice(&base[..from_base]);
    let end = offset + n as u64;
    for p in pieces {
        match &p.kind {
            PieceKind::Write { offset: w, data } => {
                let (ws, we) = (*w, *w + data.len() as u64);
                let (s, e) = (ws.max(offset), we.min(end));
                if s < e {
                    out[(s - offset) as usize..(e - offset) as usize]
                        .copy_from_slice(&data[(s - ws) as usize..(e - ws) as usize]);
                }
            }
            PieceKind::Truncate { size: t } => {
                // Bytes past a truncation point read as zeros if the file grows again.
                if *t < end {
                    let from = t.saturating_sub(offset) as usize;
                    out[from..].fill(0);
                }
            }
        }
    }
    out
}

impl Overlay {
    pub fn push(&mut self, ino: u64, piece: Piece) {
        if let PieceKind::Write { data, .. } = &piece.kind {
            self.bytes += data.len();
        }
        self.files.entry(ino).or_default().push(piece);
    }

    pub fn pieces(&self, ino: u64) -> &[Piece] {
        self.files.get(&ino).map_or(&[], Vec::as_slice)
    }

    /// Bytes of write data held (the backpressure measure).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Forget every piece that travels in a batch with seq ≤ `seq` (it is now in the tree).
    pub fn drop_upto(&mut self, seq: u64) {
        let mut freed = 0;
        self.files.retain(|_, pieces| {
            pieces.retain(|p| {
                let keep = p.seq > seq;
                if !keep {
                    if let PieceKind::Write { data, .. } = &p.kind {
                        freed += data.len();
                    }
                }
                keep
            });
            !pieces.is_empty()
        });
        debug_assert!(
            freed <= self.bytes,
            "overlay byte count {} below the {freed} bytes of the pieces it drops",
            self.bytes
        );
        self.bytes -= freed;
    }

    /// Drop everything (leadership lost: none of it was acknowledged).
    pub fn clear(&mut self) {
        self.files.clear();
        self.bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(seq: u64, offset: u64, d: &[u8]) -> Piece {
        Piece {
            seq,
            kind: PieceKind::Write {
                offset,
                data: d.into(),
            },
        }
    }
    fn t(seq: u64, size: u64) -> Piece {
        Piece {
            seq,
            kind: PieceKind::Truncate { size },
        }
    }

    /// Reference model: apply everything to a Vec and slice it.
    fn model(base: &[u8], pieces: &[Piece], offset: u64, len: usize) -> Vec<u8> {
        let mut f = base.to_vec();
        for p in pieces {
            match &p.kind {
                PieceKind::Write { offset, data } => {
                    let end = *offset as usize + data.len();
                    if f.len() < end {
                        f.resize(end, 0);
                    }
                    f[*offset as usize..end].copy_from_slice(data);
                }
                PieceKind::Truncate { size } => f.resize(*size as usize, 0),
            }
        }
        let s = (offset as usize).min(f.len());
        let e = (offset as usize + len).min(f.len());
        f[s..e].to_vec()
    }

    #[test]
    fn merge_matches_model_on_tricky_sequences() {
        let base: Vec<u8> = (0..100u8).collect();
        let cases: Vec<Vec<Piece>> = vec![
            vec![],
            vec![w(1, 10, b"hello")],
            vec![w(1, 98, b"grow past the end")],
            vec![t(1, 20), w(2, 50, b"x")],
            vec![w(1, 10, b"abcdef"), t(2, 12), t(3, 40)],
            vec![t(1, 0)],
            vec![w(1, 200, b"sparse"), w(2, 0, b"A")],
            vec![w(1, 5, b"1111"), w(2, 6, b"22")],
        ];
        for (i, pieces) in cases.iter().enumerate() {
            for offset in [0u64, 5, 11, 19, 45, 99, 150, 199, 205, 300] {
                for len in [0usize, 1, 7, 64, 4096] {
                    let from = (offset as usize).min(base.len());
                    let got = merge_read(&base[from..], base.len() as u64, pieces, offset, len);
                    assert_eq!(
                        got,
                        model(&base, pieces, offset, len),
                        "case {i} @{offset}+{len}"
                    );
                }
            }
        }
    }

    #[test]
    fn drop_upto_releases_bytes_in_seq_order() {
        let mut o = Overlay::default();
        o.push(1, w(1, 0, &[0; 10]));
        o.push(1, w(2, 0, &[0; 20]));
        o.push(2, t(2, 5));
        o.push(2, w(3, 0, &[0; 5]));
        assert_eq!(o.bytes(), 35);
        o.drop_upto(2);
        assert_eq!(o.bytes(), 5);
        assert!(o.pieces(1).is_empty());
        assert_eq!(o.pieces(2).len(), 1);
        assert_eq!(size_after(100, o.pieces(2)), 100);
    }
}
