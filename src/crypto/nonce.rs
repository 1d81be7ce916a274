//! Random nonces without a system call per value.
//!
//! Each thread draws from `rand`'s thread-local generator ([`rand::rng`]): a
//! ChaCha12 CSPRNG seeded from the operating system and reseeded from it
//! every 64 KiB of output; drawing 12 bytes costs ~15 ns against ~430 ns for
//! `getrandom` (`nonce/12-bytes` in `benches/codec.rs`).
//! Random 96-bit nonces stay safe up to 2^32 values per key (README,
//! Guarantees 7).

use rand::Rng as _;

/// Fills `buf` with fresh random bytes from this thread's generator (which
/// panics if the operating system refuses to seed it: no safe way to encrypt).
pub fn fill(buf: &mut [u8]) {
    rand::rng().fill_bytes(buf);
}

#[cfg(test)]
mod tests {
    #[test]
    fn two_nonces_differ() {
        let (mut a, mut b) = ([0u8; 12], [0u8; 12]);
        super::fill(&mut a);
        super::fill(&mut b);
        assert_ne!(a, b);
    }
}
