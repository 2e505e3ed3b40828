//! The compact byte form a store may keep HEAD validators and op results
//! in: what cannot be derived, in its smallest faithful form; and the
//! text form of a spec's rarer parts (mirrors, headers).
//!
//! Digests are 32 raw bytes, numbers LEB128 varints, strings
//! length-prefixed UTF-8, and a published blob's path is left out when it
//! is the one its digest implies ([`BlobInfo::path_for`]). Decoding gives
//! back exactly what was encoded; anything else decodes to `None`.

use crate::digest::Digest32;
use crate::job::{BlobInfo, HeadInfo};
use crate::ledger::{OpKind, OpResult, StreamInfo};
use crate::spec::{CanonicalUrl, JobSpec};

const ETAG: u8 = 1;
const LAST_MODIFIED: u8 = 2;
const CONTENT_LENGTH: u8 = 4;
const CONTENT_TYPE: u8 = 8;
const ACCEPT_RANGES: u8 = 16;
const SHA256: u8 = 32;

/// The marker before a blob path that is not the one its digest implies.
const OWN_PATH: u8 = 1;

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_varint(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

/// A cursor over encoded bytes; every read is checked.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }

    fn varint(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            v |= u64::from(b & 0x7f).checked_shl(shift)?;
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn string(&mut self) -> Option<String> {
        let n = usize::try_from(self.varint()?).ok()?;
        String::from_utf8(self.take(n)?.to_vec()).ok()
    }

    fn digest(&mut self) -> Option<Digest32> {
        Some(Digest32::from_bytes(self.take(32)?.try_into().ok()?))
    }

    fn end(self) -> Option<()> {
        self.0.is_empty().then_some(())
    }
}

/// HEAD's validators in their compact form.
pub fn encode_head(h: &HeadInfo) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    put_varint(&mut out, u64::from(h.status));
    let flags = [
        (h.etag.is_some(), ETAG),
        (h.last_modified.is_some(), LAST_MODIFIED),
        (h.content_length.is_some(), CONTENT_LENGTH),
        (h.content_type.is_some(), CONTENT_TYPE),
        (h.accept_ranges, ACCEPT_RANGES),
        (h.sha256.is_some(), SHA256),
    ]
    .into_iter()
    .filter(|(on, _)| *on)
    .fold(0, |f, (_, bit)| f | bit);
    out.push(flags);
    if let Some(s) = &h.etag {
        put_str(&mut out, s);
    }
    if let Some(s) = &h.last_modified {
        put_str(&mut out, s);
    }
    if let Some(n) = h.content_length {
        put_varint(&mut out, n);
    }
    if let Some(s) = &h.content_type {
        put_str(&mut out, s);
    }
    if let Some(d) = &h.sha256 {
        out.extend_from_slice(d.as_bytes());
    }
    out
}

fn read_head(r: &mut Reader<'_>) -> Option<HeadInfo> {
    let status = u16::try_from(r.varint()?).ok()?;
    let flags = r.byte()?;
    if flags & !(ETAG | LAST_MODIFIED | CONTENT_LENGTH | CONTENT_TYPE | ACCEPT_RANGES | SHA256) != 0
    {
        return None;
    }
    let on = |bit: u8| flags & bit != 0;
    Some(HeadInfo {
        status,
        etag: if on(ETAG) { Some(r.string()?) } else { None },
        last_modified: if on(LAST_MODIFIED) {
            Some(r.string()?)
        } else {
            None
        },
        content_length: if on(CONTENT_LENGTH) {
            Some(r.varint()?)
        } else {
            None
        },
        content_type: if on(CONTENT_TYPE) {
            Some(r.string()?)
        } else {
            None
        },
        accept_ranges: on(ACCEPT_RANGES),
        sha256: if on(SHA256) { Some(r.digest()?) } else { None },
    })
}

pub fn decode_head(bytes: &[u8]) -> Option<HeadInfo> {
    let mut r = Reader(bytes);
    let h = read_head(&mut r)?;
    r.end()?;
    Some(h)
}

/// An op's result in its compact form; its kind is stored beside it.
pub fn encode_result(res: &OpResult) -> Vec<u8> {
    match res {
        OpResult::Head(h) => encode_head(h),
        OpResult::Stream(si) => {
            let mut out = si.sha256.as_bytes().to_vec();
            put_varint(&mut out, si.size);
            put_varint(&mut out, si.resumed_from);
            out
        }
        OpResult::Finalize(b) => {
            let mut out = b.sha256.as_bytes().to_vec();
            put_varint(&mut out, b.size);
            if b.path != BlobInfo::path_for(&b.sha256) {
                out.push(OWN_PATH);
                out.extend_from_slice(b.path.as_bytes());
            }
            out
        }
    }
}

pub fn decode_result(kind: OpKind, bytes: &[u8]) -> Option<OpResult> {
    let mut r = Reader(bytes);
    let res = match kind {
        OpKind::Head => OpResult::Head(read_head(&mut r)?),
        OpKind::Stream => OpResult::Stream(StreamInfo {
            sha256: r.digest()?,
            size: r.varint()?,
            resumed_from: r.varint()?,
        }),
        OpKind::Finalize => {
            let sha256 = r.digest()?;
            let size = r.varint()?;
            let path = match r.byte() {
                None => BlobInfo::path_for(&sha256),
                Some(OWN_PATH) => String::from_utf8(std::mem::take(&mut r.0).to_vec()).ok()?,
                Some(_) => return None,
            };
            OpResult::Finalize(BlobInfo { sha256, size, path })
        }
    };
    r.end()?;
    Some(res)
}

/// What a spec holds beyond its URL, digest and type (its mirrors and
/// request headers), as a store keeps it: JSON text, or `None` when the
/// spec has neither (most do, and then the row holds nothing).
pub fn encode_extra(spec: &JobSpec) -> Option<String> {
    if spec.mirrors.is_empty() && spec.headers.is_empty() {
        return None;
    }
    let extra = Extra {
        mirrors: spec.mirrors.clone(),
        headers: spec.headers.clone(),
    };
    serde_json::to_string(&extra).ok()
}

/// Puts what [`encode_extra`] kept back into `spec`; `None` when `text`
/// is not such a record.
pub fn decode_extra(spec: &mut JobSpec, text: &str) -> Option<()> {
    let extra: Extra = serde_json::from_str(text).ok()?;
    spec.mirrors = extra.mirrors;
    spec.headers = extra.headers;
    Some(())
}

/// The mirrors alone from what [`encode_extra`] kept: a payload's
/// fingerprint covers them, not the headers.
pub fn decode_mirrors(text: &str) -> Option<Vec<CanonicalUrl>> {
    serde_json::from_str::<Extra>(text).ok().map(|e| e.mirrors)
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Extra {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    mirrors: Vec<CanonicalUrl>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    headers: Vec<(String, String)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn heads() -> Vec<HeadInfo> {
        vec![
            HeadInfo::default(),
            HeadInfo {
                status: 200,
                etag: Some("\"5f3a-1b2c\"".into()),
                last_modified: Some("Tue, 15 Nov 2022 08:12:31 GMT".into()),
                content_length: Some(u64::MAX),
                content_type: Some("application/pdf".into()),
                accept_ranges: true,
                sha256: Some(Digest32::of(b"x")),
            },
            HeadInfo {
                status: 404,
                etag: Some(String::new()),
                content_length: Some(0),
                ..HeadInfo::default()
            },
        ]
    }

    #[test]
    fn every_form_round_trips() {
        let d = Digest32::of(b"blob");
        let mut results: Vec<OpResult> = heads().into_iter().map(OpResult::Head).collect();
        results.extend([
            OpResult::Stream(StreamInfo {
                sha256: d,
                size: 300,
                resumed_from: 128,
            }),
            OpResult::Finalize(BlobInfo::new(d, 1 << 40)),
            OpResult::Finalize(BlobInfo {
                sha256: d,
                size: 1,
                path: String::new(),
            }),
            OpResult::Finalize(BlobInfo {
                sha256: d,
                size: 1,
                path: "elsewhere/x".into(),
            }),
        ]);
        for res in results {
            let bytes = encode_result(&res);
            assert_eq!(decode_result(res.kind(), &bytes), Some(res.clone()));
            if let OpResult::Head(h) = &res {
                assert_eq!(decode_head(&encode_head(h)).as_ref(), Some(h));
            }
        }
    }

    #[test]
    fn a_derived_path_costs_nothing() {
        let b = BlobInfo::new(Digest32::of(b"blob"), 1000);
        assert_eq!(encode_result(&OpResult::Finalize(b)).len(), 32 + 2);
    }

    #[test]
    fn damaged_bytes_decode_to_none() {
        let h = encode_head(&heads()[1]);
        for n in 0..h.len() {
            assert_eq!(decode_head(&h[..n]), None, "truncated at {n}");
        }
        let mut long = h.clone();
        long.push(0);
        assert_eq!(decode_head(&long), None);
        assert_eq!(decode_head(&[200, 1, 0x40]), None);
        assert_eq!(decode_result(OpKind::Stream, &[0; 31]), None);
        assert_eq!(decode_head(&[0xff; 11]), None);
    }
}
