//! Loading the bench table: patient-records-shaped rows sealed under the old
//! key, written with binary COPY, then analyzed and checkpointed like a
//! long-lived table.

use std::time::Instant;

use rayon::prelude::*;
use tokio_postgres::Client;

use crate::crypto::codec::{versioned_gcm::VersionedGcm, Codec};
use crate::crypto::keyring::Keyring;
use crate::db::binary_copy::{encode_tuple, send, CopyBuffer, COPY_PIECE};
use crate::error::DbContext;
use crate::Error;

/// Creates and fills the patient-records-shaped table, then makes it as a long-lived
/// table would be: primary key built, vacuumed, analyzed, checkpointed.
pub(super) async fn load(
    client: &Client,
    table: &str,
    rows: u64,
    old: &Keyring,
) -> Result<f64, Error> {
    let what = || "loading the bench table".to_string();
    let started = Instant::now();
    client
        .batch_execute(&format!("CREATE TABLE {table} (id bigint NOT NULL, name text NOT NULL, a bytea, b bytea, notes text)"))
        .await
        .ctx(what)?;
    let codec = VersionedGcm::new(old).map_err(|e| Error::Runtime(e.to_string()))?;
    const CHUNK: u64 = 20_000;
    let mut first = 1u64;
    while first <= rows {
        let last = (first + CHUNK - 1).min(rows);
        let encoded: Vec<Vec<u8>> = (first..=last)
            .into_par_iter()
            .map(|id| {
                let mut tuple = Vec::with_capacity(260);
                let mut a = Vec::new();
                let mut b = Vec::new();
                codec.seal(format!("+1555{id:07}").as_bytes(), b"", None, &mut a);
                if id % 3 != 0 {
                    codec.seal(format!("+1444{id:07}").as_bytes(), b"", None, &mut b);
                }
                let name = format!("patient {id}");
                encode_tuple(
                    &mut tuple,
                    &[
                        Some(&(id as i64).to_be_bytes()),
                        Some(name.as_bytes()),
                        Some(&a),
                        (id % 3 != 0).then_some(&b[..]),
                        Some(&[b'n'; 120]),
                    ],
                );
                tuple
            })
            .collect();
        let sink = client
            .copy_in::<_, bytes::Bytes>(&format!("COPY {table} FROM STDIN (FORMAT binary)"))
            .await
            .ctx(what)?;
        futures_util::pin_mut!(sink);
        // sent a piece at a time: the connection, which the bench's controls
        // use through the timed runs, keeps its largest message's room
        let mut buf = CopyBuffer::with_capacity(COPY_PIECE + COPY_PIECE / 4);
        for tuple in &encoded {
            buf.raw(tuple);
            if buf.len() >= COPY_PIECE {
                send(sink.as_mut(), buf.take()).await.ctx(what)?;
            }
        }
        send(sink.as_mut(), buf.finish()).await.ctx(what)?;
        sink.finish().await.ctx(what)?;
        first = last + 1;
    }
    client
        .batch_execute(&format!("ALTER TABLE {table} ADD PRIMARY KEY (id)"))
        .await
        .ctx(what)?;
    client
        .batch_execute(&format!("VACUUM ANALYZE {table}"))
        .await
        .ctx(what)?;
    // Needs superuser or pg_checkpoint; without it the figures are a little noisier.
    let _ = client.batch_execute("CHECKPOINT").await;
    Ok(started.elapsed().as_secs_f64())
}
