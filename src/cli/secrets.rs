//! `rekey secrets`: the lifecycle one step at a time: init, show, stage,
//! promote, rollback, retire.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use crate::cli::args::{
    ForgetArgs, InitArgs, KeyArgs, LifecycleArgs, PurgeArgs, RetireArgs, SecretsCommand, StatusArgs,
};
use crate::cli::exit::EXIT_LEFT_ON_OLD_KEYS;
use crate::cli::out::{eout, out};
use crate::cli::rotate::{report, rotate_options};
use crate::cli::{default_lanes, open, print_json, resolve, Opened};
use crate::crypto::keyring::{generate_material, Key};
use crate::crypto::keytable::{now, Entry, KeyState, KeyTable};
use crate::db::idle::keeping_alive;
use crate::job::{Job, JobSpec};
use crate::lifecycle::audit::What;
use crate::lifecycle::promotion;
use crate::lifecycle::rotation::{
    compromise_in_progress, job_keys, refuse_beside_a_staged_key_not_yet_set,
    refuse_filtered_compromise, RotateOptions,
};
use crate::lifecycle::steps::{self, Applied};
use crate::secrets::{uses, KeysSpec, Store};
use crate::state::{self, rotations};
use crate::Error;

/// `rekey secrets ...`.
pub async fn secrets(command: SecretsCommand) -> Result<u8, Error> {
    match &command {
        SecretsCommand::Init(a) => init(a).await,
        SecretsCommand::Show(a) => show(a).await,
        SecretsCommand::Stage(a) | SecretsCommand::Promote(a) | SecretsCommand::Rollback(a) => {
            transition(&command, a).await
        }
        SecretsCommand::Retire(a) => retire(a).await,
        SecretsCommand::Restore(a) => restore(a).await,
        SecretsCommand::Purge(a) => purge(a).await,
        SecretsCommand::Rewrap(a) => crate::cli::rewrap::rewrap(a).await,
        SecretsCommand::Forget(a) => forget(a).await,
    }
}

/// `rekey secrets forget`: a database's record of using the store dropped
/// ([`crate::secrets::uses`]), so that a retire no longer waits for a run
/// there; audited.
async fn forget(a: &ForgetArgs) -> Result<u8, Error> {
    let (spec, Opened { client, .. }, mut store) = locked(&a.life).await?;
    let Some(records) = store.uses_now().await? else {
        return Err(Error::Config(format!(
            "{} keeps no record of the databases using it (keyring files, KMS keyring files and Secrets Manager \
             secrets do): nothing to forget",
            store.secret_id()
        )));
    };
    if !records.iter().any(|u| u.database_id == a.database) {
        return Err(Error::Config(format!(
            "{} holds no record of database {:?}; it records {}. Nothing was changed",
            store.secret_id(),
            a.database,
            if records.is_empty() {
                "none".to_string()
            } else {
                records
                    .iter()
                    .map(|u| u.describe())
                    .collect::<Vec<_>>()
                    .join("; ")
            }
        )));
    }
    let secret_id = store.secret_id();
    let mut gone = Vec::new();
    // read again under the store's guard: another database's run may record meanwhile
    store
        .update_uses(|records| {
            gone = uses::forget(records, &a.database);
            !gone.is_empty()
        })
        .await?;
    let note = format!(
        "forgot that {} may have values under {}",
        gone.iter()
            .map(|u| u.describe())
            .collect::<Vec<_>>()
            .join("; "),
        gone.iter()
            .flat_map(|u| u.keys.iter().map(|k| format!("key {k}")))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect::<Vec<_>>()
            .join(", ")
    );
    if !gone.is_empty() {
        recorded(
            &a.life,
            &spec,
            &client,
            &secret_id,
            "store_use_forgotten",
            &note,
        )
        .await?;
    }
    if a.life.common.json {
        print_json(
            &json!({ "event": "store_use_forgotten", "changed": !gone.is_empty(), "forgotten": gone }),
        );
    } else if gone.is_empty() {
        out!(
            "{secret_id} no longer held a record of database {}: nothing was changed",
            a.database
        );
    } else {
        out!("{secret_id}: {note}");
    }
    Ok(0)
}

/// `rekey secrets restore`: a retired key back from the archive, as previous.
async fn restore(a: &KeyArgs) -> Result<u8, Error> {
    let (spec, Opened { client, .. }, mut store) = locked(&a.life).await?;
    let applied =
        keeping_alive(&client, steps::restore(&mut store, a.key_id, a.life.reveal)).await?;
    let note = format!("key {} restored from the archive as previous", a.key_id);
    // a step that changed nothing (run again) is not an event
    if applied.changed {
        recorded(
            &a.life,
            &spec,
            &client,
            &format!("{}#{}", store.secret_id(), a.key_id),
            "key_restored",
            &note,
        )
        .await?;
    }
    said(&a.life, "key_restored", &applied, &note);
    Ok(0)
}

/// `rekey secrets purge`: archived material destroyed.
async fn purge(a: &PurgeArgs) -> Result<u8, Error> {
    let (spec, Opened { db, client, .. }, mut store) = locked(&a.life).await?;
    let retired: Vec<_> = store
        .table()
        .entries
        .iter()
        .filter(|e| e.state == KeyState::Retired && a.key_id.is_none_or(|id| id == e.id))
        .map(|e| e.id)
        .collect();
    // fetched first: Secrets Manager keeps a retired key's material in
    // former versions, and the proof below needs to know it is held
    keeping_alive(&client, async {
        for &id in &retired {
            store.fetch_archived(id).await?;
        }
        Ok::<_, Error>(())
    })
    .await?;
    let archived: Vec<_> = store
        .table()
        .entries
        .iter()
        .filter(|e| retired.contains(&e.id) && e.key.is_some())
        .map(|e| e.id)
        .collect();
    if !archived.is_empty() {
        // nor of another database sharing the keyring file
        for &id in &archived {
            crate::lifecycle::retire::refuse_other_databases(&client, &store, id, "purged").await?;
        }
        // destroyed for good: only once no value of the job could need it
        let job = Arc::new(Job::resolve(&spec, &client).await?);
        let refused = Box::pin(crate::lifecycle::retire::purge_refused(
            &db,
            &client,
            &job,
            &store.secret_id(),
            &archived,
            default_lanes(),
        ))
        .await?;
        if let Some((why, named)) = refused {
            if a.life.common.json {
                print_json(
                    &json!({ "event": "key_purged", "changed": false, "refused": why, "named_keys": named }),
                );
            } else {
                eout!("rekey: {why}");
            }
            return Ok(EXIT_LEFT_ON_OLD_KEYS);
        }
    }
    if !archived.is_empty() {
        // evidence first: a purge stopped after its store write (Secrets
        // Manager's delete) has destroyed the material already, and no
        // later purge finds anything left to record
        recorded(
            &a.life,
            &spec,
            &client,
            &store.secret_id(),
            "key_purge_started",
            &format!(
                "destroying the archived material of keys {archived:?}; a key_purged event follows once it is done, \
                 and without one the purge was stopped: its keys may be destroyed already"
            ),
        )
        .await?;
    }
    let (purged, applied) = keeping_alive(&client, steps::purge(&mut store, a.key_id)).await?;
    let note = if purged.is_empty() {
        "no archived key to purge".to_string()
    } else {
        format!("destroyed the archived material of keys {purged:?}")
    };
    if applied.changed {
        recorded(
            &a.life,
            &spec,
            &client,
            &store.secret_id(),
            "key_purged",
            &note,
        )
        .await?;
    }
    said(&a.life, "key_purged", &applied, &note);
    Ok(0)
}

/// Writes one audit event of a `secrets` command.
pub(crate) async fn recorded(
    life: &LifecycleArgs,
    spec: &JobSpec,
    client: &tokio_postgres::Client,
    secret_id: &str,
    event: &'static str,
    note: &str,
) -> Result<(), Error> {
    let audit = rotate_options(life, spec, default_lanes(), 5000, Duration::ZERO, false).audit;
    audit
        .record(
            client,
            What {
                event_type: event,
                secret_id,
                verification_status: "not_applicable",
                affected_records: None,
                notes: note,
                job_id: None,
            },
        )
        .await?;
    Ok(())
}

/// Prints what a `secrets` command changed.
fn said(life: &LifecycleArgs, event: &str, applied: &Applied, note: &str) {
    if life.common.json {
        print_json(
            &json!({ "event": event, "changed": applied.changed, "note": note, "skipped": applied.skipped, "instructions": applied.instructions }),
        );
    } else {
        if let Some(why) = &applied.skipped {
            out!("{why}");
        }
        out!(
            "{note}{}",
            if applied.changed {
                ""
            } else {
                " (nothing to change)"
            }
        );
        for i in &applied.instructions {
            out!("  {i}");
        }
    }
}

/// `rekey secrets init`: a new store holding one fresh key, or the
/// environment's keys (`--import-env`).
async fn init(a: &InitArgs) -> Result<u8, Error> {
    if a.adopt {
        let (spec, _) = resolve(&a.life.common)?;
        return adopt(&a.life, &job_keys(&spec)?).await;
    }
    // the database first: the keys made are recorded in its audit trail,
    // and two inits of one job do not race (the lifecycle's lock)
    let (spec, Opened { client, .. }) = {
        let mut opened = open(&a.life.common).await?;
        state::ensure_schema(&mut opened.client).await?;
        state::lock_lifecycle(
            &opened.client,
            opened.spec.name.as_deref().unwrap_or_default(),
        )
        .await?;
        (opened.spec.clone(), opened)
    };
    let keys = job_keys(&spec)?;
    let table = match &a.import_env {
        Some(prefix) => Store::open(&KeysSpec::env(prefix)).await?.table().clone(),
        None => {
            let at = now();
            let key = Key::new(1, *generate_material());
            KeyTable {
                entries: vec![Entry {
                    id: 1,
                    state: KeyState::Current,
                    created_at: at,
                    changed_at: at,
                    key: Some(key),
                    compromised: false,
                }],
            }
        }
    };
    let ids: Vec<_> = table.entries.iter().map(|e| e.id).collect();
    let info = table.info();
    let created = keeping_alive(&client, Store::create(&keys, table)).await?;
    let note = format!(
        "created {created} with keys {ids:?}{}",
        if a.import_env.is_some() {
            " (imported from the environment)"
        } else {
            ""
        }
    );
    recorded(
        &a.life,
        &spec,
        &client,
        &created,
        "key_store_created",
        &note,
    )
    .await?;
    if a.life.common.json {
        print_json(&json!({ "event": "key_store_created", "created": created, "keys": info }));
    } else {
        out!("{note}");
    }
    Ok(0)
}

/// `rekey secrets init --adopt`: the existing store read as the job's
/// layout says, checked to form a keyring, described; nothing is written.
async fn adopt(life: &LifecycleArgs, keys: &KeysSpec) -> Result<u8, Error> {
    let store = Store::open(keys).await?;
    store.table().keyring().map_err(|e| {
        Error::Config(format!(
            "{} does not hold a usable keyring: {e}",
            store.secret_id()
        ))
    })?;
    let info = store.table().info();
    let layout = store.describe_layout();
    if life.common.json {
        print_json(&json!({ "adopted": store.secret_id(), "layout": layout, "keys": info }));
    } else {
        out!(
            "adopted {} as it is ({layout}); nothing was written",
            store.secret_id()
        );
        for k in &info {
            out!(
                "  key {:>3}  {:<9}  fingerprint {}  created {}",
                k.id,
                k.state.to_string(),
                k.fingerprint,
                k.created_at
            );
        }
    }
    Ok(0)
}

/// `rekey secrets show`: ids, states and fingerprints, never key values.
async fn show(life: &StatusArgs) -> Result<u8, Error> {
    let (spec, _) = resolve(&life.common)?;
    let store = Store::open(&job_keys(&spec)?).await?;
    let info = store.table().info();
    let used = store.uses_now().await?.unwrap_or_default();
    if life.common.json {
        print_json(&json!({ "secret_id": store.secret_id(), "keys": info, "uses": used }));
    } else {
        out!("{}", store.secret_id());
        for k in &info {
            let mut state = if k.archived {
                "retired (archived)".to_string()
            } else {
                k.state.to_string()
            };
            if k.compromised {
                state.push_str(", COMPROMISED");
            }
            out!(
                "  key {:>3}  {:<18}  fingerprint {:<8}  created {}  state since {}",
                k.id,
                state,
                k.fingerprint,
                k.created_at,
                k.changed_at
            );
        }
        for u in used {
            let keys: Vec<String> = u.keys.iter().map(ToString::to_string).collect();
            out!(
                "  used by {}: values may be under key(s) {}",
                u.describe(),
                keys.join(", ")
            );
        }
    }
    Ok(0)
}

/// The job's store, opened under the job's lifecycle lock (another command
/// may have changed it meanwhile), and a connection holding that lock.
pub(crate) async fn locked(life: &LifecycleArgs) -> Result<(JobSpec, Opened, Store), Error> {
    let mut opened = open(&life.common).await?;
    let spec = opened.spec.clone();
    let keys = job_keys(&spec)?;
    state::ensure_schema(&mut opened.client).await?;
    state::lock_lifecycle(&opened.client, spec.name.as_deref().unwrap_or_default()).await?;
    // the lock's session is kept from idling while the store works (a KMS
    // call per key, a purge's wait for Secrets Manager)
    let store = keeping_alive(&opened.client, Store::open(&keys)).await?;
    Ok((spec, opened, store))
}

/// `rekey secrets stage|promote|rollback`.
async fn transition(command: &SecretsCommand, life: &LifecycleArgs) -> Result<u8, Error> {
    let (spec, Opened { db, client, .. }, mut store) = locked(life).await?;
    let secret_id = store.secret_id();
    let compromised = matches!(command, SecretsCommand::Promote(_))
        && (life.is_compromise()
            || compromise_in_progress(&client, spec.name.as_deref().unwrap_or_default()).await?);
    if compromised {
        // a compromise promote marks the old key compromised (the key
        // table's status the application reads): never for a job whose
        // verify cannot see every row, so could never retire it
        refuse_filtered_compromise(&spec, true)?;
    }
    if matches!(command, SecretsCommand::Promote(_)) {
        // boxed: a full verify's future off the stack that polls it
        let refused = Box::pin(promotion::refused(
            &db,
            &client,
            &spec,
            &store,
            default_lanes(),
            Duration::from_secs(120),
        ))
        .await?;
        if let Some(why) = refused {
            if life.common.json {
                print_json(&json!({ "event": "key_promoted", "changed": false, "refused": why }));
            } else {
                eout!("rekey: {why}");
            }
            return Ok(EXIT_LEFT_ON_OLD_KEYS);
        }
    }
    let (event, applied, key, note) = match command {
        SecretsCommand::Stage(_) => {
            let name = spec.name.as_deref().unwrap_or_default();
            refuse_beside_a_staged_key_not_yet_set(&client, name, &job_keys(&spec)?.prefix, &store)
                .await?;
            let (id, applied) = {
                let recorded = steps::recorded_key_id(&client, &store, &spec).await?;
                let staged = steps::stage(&mut store, &spec, life.reveal, recorded.as_ref());
                keeping_alive(&client, staged).await?
            };
            ("key_staged", applied, id, format!("key {id} pending"))
        }
        SecretsCommand::Promote(_) => {
            let applied = keeping_alive(
                &client,
                steps::promote(&mut store, life.reveal, compromised),
            )
            .await?;
            let current = steps::current(&store).unwrap_or_default();
            (
                "key_promoted",
                applied,
                current,
                format!("key {current} current"),
            )
        }
        SecretsCommand::Rollback(_) => {
            let promoted_by_rekey = match steps::current(&store) {
                Some(c) => {
                    rotations::promoted_to(&client, spec.name.as_deref().unwrap_or_default(), c)
                        .await?
                }
                None => false,
            };
            let applied = keeping_alive(
                &client,
                steps::rollback(&mut store, life.reveal, promoted_by_rekey),
            )
            .await?;
            let current = steps::current(&store).unwrap_or_default();
            (
                "key_rolled_back",
                applied,
                current,
                format!("key {current} current"),
            )
        }
        _ => return Err(Error::Runtime("not a key transition".into())),
    };
    let note = if applied.instructions.is_empty() {
        note
    } else {
        format!(
            "{note}, once the changes printed are made where the application's environment is set"
        )
    };
    // a step that changed nothing (run again) is not an event
    if applied.changed {
        let key_ref = format!("{secret_id}#{key}");
        // the audit event says why a new key's id skipped, as the output does
        let noted = match &applied.skipped {
            Some(why) => format!("{note} ({why})"),
            None => note.clone(),
        };
        recorded(life, &spec, &client, &key_ref, event, &noted).await?;
    }
    if matches!(command, SecretsCommand::Rollback(_)) {
        // after its event, which belongs to the rotation this closes
        rotations::roll_back(&client, spec.name.as_deref().unwrap_or_default()).await?;
    }
    said(life, event, &applied, &note);
    Ok(0)
}

/// `rekey secrets retire`: retires a previous key once no value needs it.
async fn retire(a: &RetireArgs) -> Result<u8, Error> {
    let (spec, Opened { db, client, .. }, mut store) = locked(&a.life).await?;
    let previous = store.table().previous_ids();
    let id = match (a.key_id, previous.as_slice()) {
        (Some(id), _) => id,
        (None, [one]) => *one,
        (None, []) => return Err(Error::Config("no previous key to retire".into())),
        (None, many) => {
            return Err(Error::Config(format!(
                "several previous keys ({many:?}): say which with --key-id"
            )))
        }
    };
    let compromised = a.life.is_compromise()
        || compromise_in_progress(&client, spec.name.as_deref().unwrap_or_default()).await?;
    let opts = RotateOptions {
        compromised,
        accept_unverified: a.accept_unverified.clone(),
        wait_for_writers: a.wait_for_writers,
        wait_for_replicas: a.wait_for_replicas,
        ..rotate_options(&a.life, &spec, default_lanes(), 5000, Duration::ZERO, false)
    };
    let job = Arc::new(Job::resolve(&spec, &client).await?);
    // boxed: the retire's future (a full verify's inside) off the stack that polls it
    let p = Box::pin(crate::lifecycle::retire::retire(
        &db, &client, &job, &mut store, id, &opts,
    ))
    .await?;
    Ok(report(&a.life, &spec, &p))
}
