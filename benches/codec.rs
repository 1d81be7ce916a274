//! Re-encrypts per second per core, for sizing the transform stage.
//!
//! Each iteration is one value of a 128-byte plaintext through the codecs
//! directly (no database, no rayon), so criterion's elements/s is one core's
//! ceiling:
//!
//! - `rewrite/versioned-gcm`: `transform::reseal`, the per-value core of a
//!   key rotation: open under the old key, seal under the target key, open
//!   the new value again and compare (verify-before-write).
//! - `migrate/fernet->versioned-gcm`: the Fernet to `versioned-gcm`
//!   migration, decrypt + encrypt, of a token under the application's
//!   current Fernet key; `+verify` adds the check as above.
//! - `versioned-gcm/open`, `versioned-gcm/seal`, `fernet/open`,
//!   `fernet/seal`: the halves alone, for profiling; `fernet/open-old-key`
//!   opens a token under the second key tried (one more HMAC, as MultiFernet).
//! - `nonce/12-bytes`: one random GCM nonce from `codec::nonce::fill`, the
//!   thread-local CSPRNG every seal draws from.
//! - `search-hash/rehash-hex`: a search hash's share of a rotation: which
//!   key a stored hex hash of an SSN-sized plaintext is under (the target
//!   key's tried first, then the old one's), and the hash under the target
//!   key (the decrypt it also needs is the codec's, above).
//!
//! Run: `cargo bench --bench codec -- --warm-up-time 1 --measurement-time 3`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rekey::crypto::codec::fernet::Fernet;
use rekey::crypto::codec::versioned_gcm::VersionedGcm;
use rekey::crypto::codec::Codec;
use rekey::crypto::keyring::{Key, Keyring};
use rekey::crypto::search_hash::{HashOutput, SearchHasher};

/// Plaintext length of every benchmarked value.
const PLAINTEXT_LEN: usize = 128;

/// Where a benchmark's new ciphertext goes: nowhere, but not optimised away.
fn kept(sealed: &[u8]) -> Result<(), rekey::crypto::codec::CodecError> {
    black_box(sealed);
    Ok(())
}

/// A fixed 128-byte plaintext.
fn plaintext() -> Vec<u8> {
    (0..PLAINTEXT_LEN).map(|i| i as u8).collect()
}

/// Keys 1 (old) and 2 (target), and a value sealed under key 1 by `codec_for`.
fn rotation<C: Codec>(codec_for: impl Fn(&Keyring) -> C) -> (C, Vec<u8>) {
    let old = codec_for(&Keyring::new(vec![Key::new(1, [1; 32])], 1, None).expect("old keyring"));
    let mut value = Vec::new();
    old.seal(&plaintext(), b"", Some(1_700_000_000), &mut value);
    let keyring =
        Keyring::new(vec![Key::new(1, [1; 32]), Key::new(2, [2; 32])], 2, None).expect("keyring");
    (codec_for(&keyring), value)
}

/// Key rotation within `versioned-gcm`, and its halves.
fn versioned_gcm_rotation(c: &mut Criterion) {
    let (codec, value) = rotation(|k| VersionedGcm::new(k).expect("versioned-gcm"));
    let mut group = c.benchmark_group("rewrite");
    group.throughput(Throughput::Elements(1));
    group.bench_function("versioned-gcm", |b| {
        b.iter(|| {
            rekey::engine::transform::reseal(
                &codec,
                &codec,
                black_box(value.as_slice()),
                b"",
                true,
                kept,
            )
            .expect("old value reseals")
        })
    });
    group.finish();

    let mut group = c.benchmark_group("versioned-gcm");
    group.throughput(Throughput::Elements(1));
    group.bench_function("open", |b| {
        b.iter(|| {
            codec
                .open(black_box(value.as_slice()), b"")
                .expect("value opens")
        })
    });
    let pt = plaintext();
    group.bench_function("seal", |b| {
        let mut out = Vec::new();
        b.iter(|| {
            codec.seal(black_box(&pt), b"", None, &mut out);
            black_box(out.len())
        })
    });
    group.finish();
}

/// Fernet to `versioned-gcm` migration, and the Fernet halves.
fn fernet_migration(c: &mut Criterion) {
    // The application's Fernet keys 1 and 2 (current). A token under the
    // current key opens on the first HMAC; one under key 1 needs a second.
    let (fernet, old_token) = rotation(|k| Fernet::new(k).expect("fernet"));
    let mut token = Vec::new();
    fernet.seal(&plaintext(), b"", Some(1_700_000_000), &mut token);
    let gcm =
        VersionedGcm::new(&Keyring::new(vec![Key::new(1, [3; 32])], 1, None).expect("gcm keyring"))
            .expect("versioned-gcm");
    let mut group = c.benchmark_group("migrate");
    group.throughput(Throughput::Elements(1));
    group.bench_function("fernet->versioned-gcm", |b| {
        let mut sealed = Vec::new();
        b.iter(|| {
            let opened = fernet
                .open(black_box(token.as_slice()), b"")
                .expect("token opens");
            gcm.seal(&opened.plaintext, b"", None, &mut sealed);
            black_box(sealed.len())
        })
    });
    group.bench_function("fernet->versioned-gcm+verify", |b| {
        b.iter(|| {
            rekey::engine::transform::reseal(
                &fernet,
                &gcm,
                black_box(token.as_slice()),
                b"",
                false,
                kept,
            )
            .expect("token reseals")
        })
    });
    group.finish();

    let mut group = c.benchmark_group("fernet");
    group.throughput(Throughput::Elements(1));
    group.bench_function("open", |b| {
        b.iter(|| {
            fernet
                .open(black_box(token.as_slice()), b"")
                .expect("token opens")
        })
    });
    group.bench_function("open-old-key", |b| {
        b.iter(|| {
            fernet
                .open(black_box(old_token.as_slice()), b"")
                .expect("token opens")
        })
    });
    let pt = plaintext();
    group.bench_function("seal", |b| {
        let mut out = Vec::new();
        b.iter(|| {
            fernet.seal(black_box(&pt), b"", Some(1_700_000_000), &mut out);
            black_box(out.len())
        })
    });
    group.finish();
}

/// One random 12-byte nonce, as every `versioned-gcm` seal draws.
fn nonce(c: &mut Criterion) {
    let mut group = c.benchmark_group("nonce");
    group.throughput(Throughput::Elements(1));
    group.bench_function("12-bytes", |b| {
        let mut nonce = [0u8; 12];
        b.iter(|| {
            rekey::crypto::nonce::fill(black_box(&mut nonce));
            black_box(nonce)
        })
    });
    group.finish();
}

/// A hex search hash found under the old key and written under the target key.
fn search_hash(c: &mut Criterion) {
    let keyring =
        Keyring::new(vec![Key::new(1, [1; 32]), Key::new(2, [2; 32])], 2, None).expect("keyring");
    let hasher = SearchHasher::new(&keyring, HashOutput::Hex, None).expect("hasher");
    let ssn = b"123-45-6789";
    let stored = hasher.hash(1, ssn).expect("key 1 is held");
    let mut group = c.benchmark_group("search-hash");
    group.throughput(Throughput::Elements(1));
    group.bench_function("rehash-hex", |b| {
        let mut out = Vec::with_capacity(1 << 16);
        b.iter(|| {
            let key = hasher.identify(black_box(ssn), black_box(&stored));
            assert_eq!(key, Some(1));
            if out.len() > (1 << 16) - 64 {
                out.clear();
            }
            assert!(hasher.hash_into(2, black_box(ssn), &mut out));
            black_box(out.len())
        })
    });
    group.finish();
}

criterion_group!(
    benches,
    versioned_gcm_rotation,
    fernet_migration,
    nonce,
    search_hash
);
criterion_main!(benches);
