//! The [`Store`](super::Store) logic both backends share, written once.
//!
//! sqlx gives each backend its own concrete types (`Pool<Sqlite>`, `Pool<Postgres>`), and a
//! generic implementation over `sqlx::Database` drowns in trait bounds. Instead each backend
//! module defines its struct with a `pool` field and inherent `begin_write`,
//! `begin_audit_write`, `direct` and `migrator` methods (the parts that really differ: SQLite
//! takes its write lock up front with `BEGIN IMMEDIATE`, and runs its request path outside
//! sqlx, see `sqlite_direct`), then expands [`impl_store!`] to get the trait implementation.

/// Implements `Store` for a backend struct. See the module header for what it expects.
macro_rules! impl_store {
    ($store:ty) => {
        #[async_trait::async_trait]
        impl $crate::store::Store for $store {
            async fn migrate(&self) -> Result<(), $crate::store::StoreError> {
                Self::migrator().run(&self.pool).await?;
                Ok(())
            }

            async fn insert_record(
                &self,
                record: $crate::store::NewRecord,
                request: Option<$crate::store::CreateRequestKey>,
                audit: &$crate::audit::AuditEvent,
            ) -> Result<$crate::store::InsertOutcome, $crate::store::StoreError> {
                use $crate::store::{InsertOutcome, RecordMeta, StoreError};
                if let Some(request) = &request {
                    if let Some(outcome) = self.replayed_request(request).await? {
                        return Ok(outcome);
                    }
                }
                let meta = RecordMeta {
                    record_id: record.record_id.clone(),
                    version: 1,
                    created_at: record.created_at,
                    updated_at: record.created_at,
                    present_fields: $crate::store::present_fields(&record.fields),
                };
                let attempt = match self.direct() {
                    Some(direct) => direct.insert_record(record, request.clone(), audit.clone()).await?,
                    None => self.try_insert_record(&record, request.as_ref(), audit).await?,
                };
                match attempt {
                    Ok(()) => Ok(InsertOutcome::Inserted(meta)),
                    Err(refused) => {
                        // A duplicate document may be this request's own earlier attempt: a
                        // concurrent retry that won the race, or a first attempt indexed
                        // under another index version. That is a replay, not a duplicate.
                        if let (StoreError::DuplicateDocument, Some(request)) = (&refused, &request) {
                            if let Some(outcome) = self.replayed_request(request).await? {
                                return Ok(outcome);
                            }
                        }
                        Err(refused)
                    }
                }
            }

            async fn get_record(
                &self,
                record_id: &str,
            ) -> Result<Option<$crate::store::StoredRecord>, $crate::store::StoreError> {
                use sqlx::Row;
                use $crate::store::{queries, RecordMeta, SealedField, StoredRecord};
                if let Some(direct) = self.direct() {
                    return direct.get_record(record_id);
                }
                let rows = sqlx::query(queries::SELECT_LIVE_RECORD)
                    .bind(record_id)
                    .fetch_all(&self.pool)
                    .await?;
                let Some(first) = rows.first() else {
                    return Ok(None);
                };
                let wrapped_key: Option<Vec<u8>> = first.try_get("wrapped_key")?;
                let wrapped_key = wrapped_key.ok_or_else(|| {
                    $crate::store::StoreError::Corrupt("live record without a wrapped key".into())
                })?;
                let mut fields = Vec::with_capacity(rows.len());
                for row in &rows {
                    let field: Option<String> = row.try_get("field")?;
                    let ciphertext: Option<Vec<u8>> = row.try_get("ciphertext")?;
                    if let (Some(field), Some(ciphertext)) = (field, ciphertext) {
                        fields.push(SealedField { field, ciphertext });
                    }
                }
                Ok(Some(StoredRecord {
                    meta: RecordMeta {
                        record_id: record_id.to_owned(),
                        version: first.try_get("version")?,
                        created_at: first.try_get("created_at")?,
                        updated_at: first.try_get("updated_at")?,
                        present_fields: $crate::store::present_fields(&fields),
                    },
                    wrapped_key,
                    fields,
                    account: decode_account(first)?,
                }))
            }

            async fn scan_live_records(
                &self,
                after: &str,
                created_before: $crate::store::Micros,
                limit: u32,
            ) -> Result<Vec<$crate::store::StoredRecord>, $crate::store::StoreError> {
                use sqlx::Row;
                use $crate::store::{queries, RecordMeta, SealedField, StoredRecord, StoreError};
                if let Some(direct) = self.direct() {
                    return direct.scan_live_records(after, created_before, limit);
                }
                let rows = sqlx::query(queries::SCAN_LIVE_RECORDS)
                    .bind(after)
                    .bind(created_before)
                    .bind(i64::from(limit))
                    .fetch_all(&self.pool)
                    .await?;
                let mut records: Vec<StoredRecord> = Vec::new();
                for row in &rows {
                    let record_id: String = row.try_get("record_id")?;
                    if records.last().is_none_or(|last| last.meta.record_id != record_id) {
                        let wrapped_key: Option<Vec<u8>> = row.try_get("wrapped_key")?;
                        let wrapped_key = wrapped_key.ok_or_else(|| {
                            StoreError::Corrupt("live record without a wrapped key".into())
                        })?;
                        records.push(StoredRecord {
                            meta: RecordMeta {
                                record_id,
                                version: row.try_get("version")?,
                                created_at: row.try_get("created_at")?,
                                updated_at: row.try_get("updated_at")?,
                                present_fields: Vec::new(),
                            },
                            wrapped_key,
                            fields: Vec::new(),
                            account: decode_account(row)?,
                        });
                    }
                    let field: Option<String> = row.try_get("field")?;
                    let ciphertext: Option<Vec<u8>> = row.try_get("ciphertext")?;
                    if let (Some(field), Some(ciphertext), Some(record)) =
                        (field, ciphertext, records.last_mut())
                    {
                        record.meta.present_fields.push(field.clone());
                        record.fields.push(SealedField { field, ciphertext });
                    }
                }
                Ok(records)
            }

            async fn update_record(
                &self,
                update: $crate::store::RecordUpdate,
                audit: &$crate::audit::AuditEvent,
            ) -> Result<$crate::store::RecordMeta, $crate::store::StoreError> {
                use $crate::store::{queries, RecordMeta, StoreError};
                let mut tx = self.begin_write().await?;
                if let Some(refused) =
                    index_writable(&mut tx, &update.record_id, &update.indexes).await?
                {
                    tx.rollback().await?;
                    return Err(refused);
                }
                let updated = async {
                    let created_at: Option<i64> = sqlx::query_scalar(queries::UPDATE_RECORD)
                        .bind(&update.record_id)
                        .bind(update.expected_version)
                        .bind(update.updated_at)
                        .bind(&update.indexes.document)
                        .bind(&update.indexes.phone)
                        .bind(&update.age_gate)
                        .bind(&update.policy_version)
                        .bind(i64::from(update.override_suspension))
                        .bind(i64::from(update.indexes.version))
                        .fetch_optional(&mut *tx)
                        .await?;
                    let Some(created_at) = created_at else {
                        return Ok(None);
                    };
                    sqlx::query(queries::DELETE_FIELDS)
                        .bind(&update.record_id)
                        .execute(&mut *tx)
                        .await?;
                    for field in &update.fields {
                        sqlx::query(queries::INSERT_FIELD)
                            .bind(&update.record_id)
                            .bind(&field.field)
                            .bind(&field.ciphertext)
                            .execute(&mut *tx)
                            .await?;
                    }
                    insert_audit_events(&mut *tx, std::slice::from_ref(audit)).await?;
                    Ok::<Option<i64>, sqlx::Error>(Some(created_at))
                }
                .await;
                match updated {
                    Ok(Some(created_at)) => {
                        tx.commit().await?;
                        Ok(RecordMeta {
                            record_id: update.record_id,
                            version: update.expected_version + 1,
                            created_at,
                            updated_at: update.updated_at,
                            present_fields: $crate::store::present_fields(&update.fields),
                        })
                    }
                    Ok(None) => {
                        tx.rollback().await?;
                        match self.account_state(&update.record_id).await? {
                            None => Err(StoreError::NotFound),
                            Some(state) if state.deleted => Err(StoreError::NotFound),
                            Some(state) if state.suspended && !update.override_suspension => {
                                Err(StoreError::Suspended)
                            }
                            Some(_) => Err(StoreError::VersionConflict),
                        }
                    }
                    Err(error) if is_unique_violation(&error) => {
                        tx.rollback().await?;
                        Err(StoreError::DuplicateDocument)
                    }
                    Err(error) => Err(error.into()),
                }
            }

            async fn delete_record(
                &self,
                record_id: &str,
                deleted_at: $crate::store::Micros,
                override_suspension: bool,
                audit: &$crate::audit::AuditEvent,
            ) -> Result<(), $crate::store::StoreError> {
                use $crate::store::{queries, StoreError};
                let mut tx = self.begin_write().await?;
                let shredded = sqlx::query(queries::SHRED_RECORD)
                    .bind(record_id)
                    .bind(deleted_at)
                    .bind(i64::from(override_suspension))
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                if shredded == 0 {
                    tx.rollback().await?;
                    return match self.account_state(record_id).await? {
                        Some(state) if !state.deleted && state.suspended => {
                            Err(StoreError::Suspended)
                        }
                        _ => Err(StoreError::NotFound),
                    };
                }
                sqlx::query(queries::DELETE_FIELDS)
                    .bind(record_id)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(queries::SHRED_GUARDIANS)
                    .bind(record_id)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(queries::FORGET_CREATE_REQUESTS)
                    .bind(record_id)
                    .execute(&mut *tx)
                    .await?;
                insert_audit_events(&mut *tx, std::slice::from_ref(audit)).await?;
                tx.commit().await?;
                Ok(())
            }

            async fn find_by_document(
                &self,
                indexes: &[Vec<u8>],
            ) -> Result<Vec<$crate::store::LookupMatch>, $crate::store::StoreError> {
                self.find_by_index("document_index", indexes).await
            }

            async fn find_by_phone(
                &self,
                indexes: &[Vec<u8>],
            ) -> Result<Vec<$crate::store::LookupMatch>, $crate::store::StoreError> {
                self.find_by_index("phone_index", indexes).await
            }

            async fn account_state(
                &self,
                record_id: &str,
            ) -> Result<Option<$crate::store::AccountState>, $crate::store::StoreError> {
                if let Some(direct) = self.direct() {
                    return direct.account_state(record_id);
                }
                let row = sqlx::query($crate::store::queries::SELECT_ACCOUNT_STATE)
                    .bind(record_id)
                    .fetch_optional(&self.pool)
                    .await?;
                row.as_ref().map(decode_account).transpose()
            }

            async fn set_suspended(
                &self,
                record_id: &str,
                suspended: bool,
                history: &$crate::store::AccountEventRow,
                sealed_under: Option<&[u8]>,
                audit: &$crate::audit::AuditEvent,
            ) -> Result<bool, $crate::store::StoreError> {
                use $crate::store::{queries, StoreError};
                let mut tx = self.begin_write().await?;
                if !record_key_is(&mut tx, record_id, sealed_under).await? {
                    tx.rollback().await?;
                    return Err(StoreError::VersionConflict);
                }
                let changed = if suspended {
                    sqlx::query(queries::SUSPEND)
                        .bind(record_id)
                        .bind(history.occurred_at)
                } else {
                    sqlx::query(queries::REINSTATE).bind(record_id)
                }
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if changed == 0 {
                    tx.rollback().await?;
                    return match self.account_state(record_id).await? {
                        Some(state) if !state.deleted => Ok(false),
                        _ => Err(StoreError::NotFound),
                    };
                }
                insert_account_event(&mut *tx, history).await?;
                insert_audit_events(&mut *tx, std::slice::from_ref(audit)).await?;
                tx.commit().await?;
                Ok(true)
            }

            async fn list_account_events(
                &self,
                record_id: &str,
                limit: u32,
                after: Option<($crate::store::Micros, String)>,
            ) -> Result<Vec<$crate::store::AccountEventRow>, $crate::store::StoreError> {
                use sqlx::Row;
                let (time, event_id) = after.unwrap_or((i64::MIN, String::new()));
                let rows = sqlx::query($crate::store::queries::LIST_ACCOUNT_EVENTS)
                    .bind(record_id)
                    .bind(time)
                    .bind(event_id)
                    .bind(i64::from(limit))
                    .fetch_all(&self.pool)
                    .await?;
                rows.iter()
                    .map(|row| {
                        Ok($crate::store::AccountEventRow {
                            event_id: row.try_get("event_id")?,
                            record_id: row.try_get("record_id")?,
                            occurred_at: row.try_get("occurred_at")?,
                            kind: row.try_get("kind")?,
                            actor: row.try_get("actor")?,
                            reason: row.try_get("reason")?,
                            note: row.try_get("note")?,
                            ticket: row.try_get("ticket")?,
                            consent_id: row.try_get("consent_id")?,
                        })
                    })
                    .collect()
            }

            async fn insert_consent(
                &self,
                consent: &$crate::store::ConsentRow,
                history: &$crate::store::AccountEventRow,
                sealed_under: Option<&[u8]>,
                audit: &$crate::audit::AuditEvent,
            ) -> Result<(), $crate::store::StoreError> {
                let mut tx = self.begin_write().await?;
                if !record_key_is(&mut tx, &consent.record_id, sealed_under).await? {
                    tx.rollback().await?;
                    return Err($crate::store::StoreError::VersionConflict);
                }
                sqlx::query($crate::store::queries::INSERT_CONSENT)
                    .bind(&consent.consent_id)
                    .bind(&consent.record_id)
                    .bind(&consent.guardian_record_id)
                    .bind(&consent.guardian_sealed)
                    .bind(&consent.relationship)
                    .bind(&consent.evidence_ref)
                    .bind(&consent.policy_version)
                    .bind(consent.granted_at)
                    .bind(&consent.granted_by)
                    .execute(&mut *tx)
                    .await?;
                insert_account_event(&mut *tx, history).await?;
                insert_audit_events(&mut *tx, std::slice::from_ref(audit)).await?;
                tx.commit().await?;
                Ok(())
            }

            async fn revoke_consents(
                &self,
                record_id: &str,
                consent_id: Option<&str>,
                history: &$crate::store::AccountEventRow,
                sealed_under: Option<&[u8]>,
                audit: &$crate::audit::AuditEvent,
            ) -> Result<Vec<String>, $crate::store::StoreError> {
                let mut tx = self.begin_write().await?;
                if !record_key_is(&mut tx, record_id, sealed_under).await? {
                    tx.rollback().await?;
                    return Err($crate::store::StoreError::VersionConflict);
                }
                let revoked: Vec<String> = sqlx::query_scalar($crate::store::queries::REVOKE_CONSENTS)
                    .bind(record_id)
                    .bind(consent_id)
                    .bind(history.occurred_at)
                    .bind(&history.actor)
                    .fetch_all(&mut *tx)
                    .await?;
                if revoked.is_empty() {
                    tx.rollback().await?;
                    return Ok(revoked);
                }
                for (n, consent) in revoked.iter().enumerate() {
                    let entry = $crate::store::AccountEventRow {
                        event_id: format!("{}_{n}", history.event_id),
                        consent_id: Some(consent.clone()),
                        ..history.clone()
                    };
                    insert_account_event(&mut *tx, &entry).await?;
                }
                let mut audit = audit.clone();
                audit.record_ids = vec![record_id.to_owned()];
                insert_audit_events(&mut *tx, std::slice::from_ref(&audit)).await?;
                tx.commit().await?;
                Ok(revoked)
            }

            async fn bound_ciphertexts(
                &self,
                record_id: &str,
            ) -> Result<$crate::store::BoundCiphertexts, $crate::store::StoreError> {
                use $crate::store::queries;
                let notes: Vec<(String, Vec<u8>)> = sqlx::query_as(queries::SELECT_BOUND_NOTES)
                    .bind(record_id)
                    .fetch_all(&self.pool)
                    .await?;
                let guardians: Vec<(String, Vec<u8>)> =
                    sqlx::query_as(queries::SELECT_BOUND_GUARDIANS)
                        .bind(record_id)
                        .fetch_all(&self.pool)
                        .await?;
                Ok($crate::store::BoundCiphertexts { notes, guardians })
            }

            async fn expire_create_requests(
                &self,
                before: $crate::store::Micros,
            ) -> Result<u64, $crate::store::StoreError> {
                let mut tx = self.begin_write().await?;
                let removed = sqlx::query($crate::store::queries::EXPIRE_CREATE_REQUESTS)
                    .bind(before)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                tx.commit().await?;
                Ok(removed)
            }

            async fn register_chain(
                &self,
                chain_id: &str,
                started_at: $crate::store::Micros,
                genesis: &[u8],
            ) -> Result<(), $crate::store::StoreError> {
                sqlx::query($crate::store::queries::REGISTER_CHAIN)
                    .bind(chain_id)
                    .bind(started_at)
                    .bind(genesis)
                    .execute(&self.pool)
                    .await?;
                Ok(())
            }

            async fn append_audit(
                &self,
                events: &[$crate::audit::AuditEvent],
            ) -> Result<(), $crate::store::StoreError> {
                if let Some(direct) = self.direct() {
                    return direct.append_audit(events.to_vec()).await;
                }
                let mut tx = self.begin_audit_write().await?;
                insert_audit_events(&mut *tx, events).await?;
                tx.commit().await?;
                Ok(())
            }

            async fn list_audit_events(
                &self,
                query: &$crate::store::AuditQuery,
            ) -> Result<Vec<$crate::audit::StoredEvent>, $crate::store::StoreError> {
                let (cursor_time, cursor_id) = query
                    .after
                    .clone()
                    .unwrap_or((i64::MAX, String::new()));
                let from = query.from.unwrap_or(i64::MIN);
                let to = query.to.unwrap_or(i64::MAX);
                let rows = match (&query.caller, query.plaintext_only) {
                    (Some(caller), true) => {
                        let sql = $crate::store::queries::plaintext_releases();
                        sqlx::query(&sql)
                            .bind(caller)
                            .bind(from)
                            .bind(to)
                            .bind(cursor_time)
                            .bind(&cursor_id)
                            .bind(i64::from(query.limit))
                            .fetch_all(&self.pool)
                            .await?
                    }
                    _ => {
                        let sql = if query.record_id.is_some() {
                            $crate::store::queries::list_audit_events_of_record()
                        } else {
                            $crate::store::queries::list_audit_events()
                        };
                        sqlx::query(&sql)
                            .bind(&query.record_id)
                            .bind(&query.caller)
                            .bind(&query.purpose)
                            .bind(&query.outcome)
                            .bind(from)
                            .bind(to)
                            .bind(cursor_time)
                            .bind(&cursor_id)
                            .bind(i64::from(query.limit))
                            .fetch_all(&self.pool)
                            .await?
                    }
                };
                rows.iter().map(decode_event).collect()
            }

            async fn list_disclosures(
                &self,
                record_id: &str,
                purposes: &[String],
                limit: u32,
                after: Option<($crate::store::Micros, String)>,
            ) -> Result<Vec<$crate::audit::StoredEvent>, $crate::store::StoreError> {
                if purposes.is_empty() {
                    return Ok(Vec::new());
                }
                let (cursor_time, cursor_id) = after.unwrap_or((i64::MAX, String::new()));
                let sql = $crate::store::queries::disclosures(purposes.len());
                let mut query = sqlx::query(&sql)
                    .bind(record_id)
                    .bind(cursor_time)
                    .bind(cursor_id)
                    .bind(i64::from(limit));
                for purpose in purposes {
                    query = query.bind(purpose);
                }
                let rows = query.fetch_all(&self.pool).await?;
                rows.iter().map(decode_event).collect()
            }

            async fn chain_ids(&self) -> Result<Vec<String>, $crate::store::StoreError> {
                Ok(sqlx::query_scalar($crate::store::queries::CHAIN_IDS)
                    .fetch_all(&self.pool)
                    .await?)
            }

            async fn chain_heads(
                &self,
            ) -> Result<Vec<$crate::audit::ChainHead>, $crate::store::StoreError> {
                use sqlx::Row;
                let rows = sqlx::query($crate::store::queries::CHAIN_HEADS)
                    .fetch_all(&self.pool)
                    .await?;
                rows.iter()
                    .map(|row| {
                        Ok($crate::audit::ChainHead {
                            chain_id: row.try_get("chain_id")?,
                            seq: row.try_get("head_seq")?,
                            hash: row.try_get("head_hash")?,
                        })
                    })
                    .collect()
            }

            async fn chain_events(
                &self,
                chain_id: &str,
                after_seq: i64,
                limit: u32,
            ) -> Result<Vec<$crate::audit::StoredEvent>, $crate::store::StoreError> {
                let sql = $crate::store::queries::chain_events();
                let rows = sqlx::query(&sql)
                    .bind(chain_id)
                    .bind(after_seq)
                    .bind(i64::from(limit))
                    .fetch_all(&self.pool)
                    .await?;
                rows.iter().map(decode_event).collect()
            }

            async fn insert_checkpoint(
                &self,
                checkpoint: &$crate::audit::Checkpoint,
            ) -> Result<(), $crate::store::StoreError> {
                let corrupt = |e: serde_json::Error| $crate::store::StoreError::Corrupt(e.to_string());
                let heads = serde_json::to_string(&checkpoint.heads).map_err(corrupt)?;
                let link = checkpoint.link.as_ref();
                let closed = link
                    .map(|link| serde_json::to_string(&link.closed))
                    .transpose()
                    .map_err(corrupt)?;
                let mut tx = self.begin_write().await?;
                sqlx::query($crate::store::queries::INSERT_CHECKPOINT)
                    .bind(checkpoint.created_at)
                    .bind(heads)
                    .bind(&checkpoint.signature)
                    .bind(i32::from(checkpoint.format()))
                    .bind(link.map(|link| link.signer.as_str()))
                    .bind(link.map(|link| link.counter))
                    .bind(link.map(|link| link.key_id.as_str()))
                    .bind(link.map(|link| link.prev.as_slice()))
                    .bind(closed)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(())
            }

            async fn checkpoints(
                &self,
            ) -> Result<Vec<$crate::audit::Checkpoint>, $crate::store::StoreError> {
                let rows = sqlx::query(&$crate::store::queries::checkpoints())
                    .fetch_all(&self.pool)
                    .await?;
                rows.iter().map(decode_checkpoint).collect()
            }

            async fn latest_checkpoint(
                &self,
                signer: &str,
            ) -> Result<Option<$crate::audit::Checkpoint>, $crate::store::StoreError> {
                let row = sqlx::query(&$crate::store::queries::latest_signer_checkpoint())
                    .bind(signer)
                    .fetch_optional(&self.pool)
                    .await?;
                row.as_ref().map(decode_checkpoint).transpose()
            }

            async fn count_checkpoints(&self, signer: &str) -> Result<i64, $crate::store::StoreError> {
                Ok(sqlx::query_scalar($crate::store::queries::COUNT_SIGNER_CHECKPOINTS)
                    .bind(signer)
                    .fetch_one(&self.pool)
                    .await?)
            }

            async fn has_chained_checkpoints(&self) -> Result<bool, $crate::store::StoreError> {
                let found: i64 =
                    sqlx::query_scalar($crate::store::queries::CHAINED_CHECKPOINT_EXISTS)
                        .fetch_one(&self.pool)
                        .await?;
                Ok(found > 0)
            }

            async fn expiry_markers(
                &self,
            ) -> Result<Vec<$crate::audit::ExpiryMarker>, $crate::store::StoreError> {
                use sqlx::Row;
                let rows = sqlx::query($crate::store::queries::EXPIRY_MARKERS)
                    .fetch_all(&self.pool)
                    .await?;
                rows.iter()
                    .map(|row| {
                        Ok($crate::audit::ExpiryMarker {
                            chain_id: row.try_get("chain_id")?,
                            up_to_seq: row.try_get("up_to_seq")?,
                            hash: row.try_get("hash")?,
                            expired_at: row.try_get("expired_at")?,
                            signature: row.try_get("signature")?,
                        })
                    })
                    .collect()
            }

            async fn expire_chain_prefix(
                &self,
                marker: &$crate::audit::ExpiryMarker,
            ) -> Result<u64, $crate::store::StoreError> {
                let mut tx = self.begin_write().await?;
                let deleted = sqlx::query($crate::store::queries::DELETE_CHAIN_PREFIX)
                    .bind(&marker.chain_id)
                    .bind(marker.up_to_seq)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                sqlx::query($crate::store::queries::DELETE_EVENT_RECORDS_PREFIX)
                    .bind(&marker.chain_id)
                    .bind(marker.up_to_seq)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query($crate::store::queries::UPSERT_EXPIRY_MARKER)
                    .bind(&marker.chain_id)
                    .bind(marker.up_to_seq)
                    .bind(&marker.hash)
                    .bind(marker.expired_at)
                    .bind(&marker.signature)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(deleted)
            }

            async fn ping(&self) -> Result<(), $crate::store::StoreError> {
                sqlx::query("SELECT 1").execute(&self.pool).await?;
                Ok(())
            }

            async fn close(&self) {
                self.pool.close().await;
                self.close_request_path().await;
            }

            async fn seed_key_versions(
                &self,
                kind: &str,
                provider: &str,
                versions: &[(u32, &str)],
                now: $crate::store::Micros,
            ) -> Result<(), $crate::store::StoreError> {
                use $crate::store::queries;
                let mut tx = self.begin_write().await?;
                sqlx::query(Self::LOCK_KEY_ADMIN)
                    .bind(kind)
                    .fetch_optional(&mut *tx)
                    .await?;
                let known: i64 = sqlx::query_scalar(queries::COUNT_KEY_VERSIONS)
                    .bind(kind)
                    .fetch_one(&mut *tx)
                    .await?;
                if known == 0 {
                    for (version, state) in versions {
                        sqlx::query(queries::INSERT_KEY_VERSION)
                            .bind(kind)
                            .bind(i64::from(*version))
                            .bind(*state)
                            .bind(provider)
                            .bind(now)
                            .execute(&mut *tx)
                            .await?;
                    }
                }
                tx.commit().await?;
                Ok(())
            }

            async fn active_key_version(
                &self,
                kind: &str,
            ) -> Result<Option<u32>, $crate::store::StoreError> {
                let version: Option<i64> =
                    sqlx::query_scalar($crate::store::queries::SELECT_ACTIVE_KEY_VERSION)
                        .bind(kind)
                        .fetch_optional(&self.pool)
                        .await?;
                version.map(to_version).transpose()
            }

            async fn key_version_states(
                &self,
                kind: &str,
            ) -> Result<Vec<(u32, String)>, $crate::store::StoreError> {
                let rows: Vec<(i64, String)> =
                    sqlx::query_as($crate::store::queries::SELECT_KEY_VERSION_STATES)
                        .bind(kind)
                        .fetch_all(&self.pool)
                        .await?;
                rows.into_iter()
                    .map(|(version, state)| Ok((to_version(version)?, state)))
                    .collect()
            }

            async fn key_versions(
                &self,
                kind: &str,
            ) -> Result<Vec<$crate::store::KeyVersionRow>, $crate::store::StoreError> {
                let rows = sqlx::query($crate::store::queries::SELECT_KEY_VERSIONS)
                    .bind(kind)
                    .fetch_all(&self.pool)
                    .await?;
                rows.iter().map(key_version_row).collect()
            }

            async fn rotate_key(
                &self,
                kind: &str,
                expected_active: u32,
                provider: &str,
                now: $crate::store::Micros,
                provision: &$crate::store::ProvisionFn<'_>,
            ) -> Result<$crate::store::Rotation, $crate::store::StoreError> {
                use $crate::store::{queries, Rotation, StoreError};
                let mut tx = self.begin_write().await?;
                sqlx::query(Self::LOCK_KEY_ADMIN)
                    .bind(kind)
                    .fetch_optional(&mut *tx)
                    .await?;
                // Read after taking the lock: a rotation that committed while this one
                // waited is visible now.
                let active: Option<i64> = sqlx::query_scalar(queries::SELECT_ACTIVE_KEY_VERSION)
                    .bind(kind)
                    .fetch_optional(&mut *tx)
                    .await?;
                let active = active
                    .map(to_version)
                    .transpose()?
                    .ok_or_else(|| StoreError::Corrupt(format!("no active {kind} version")))?;
                if active != expected_active {
                    tx.rollback().await?;
                    return Ok(Rotation::NotRotated { active });
                }
                let max: Option<i64> = sqlx::query_scalar(queries::SELECT_MAX_KEY_VERSION)
                    .bind(kind)
                    .fetch_one(&mut *tx)
                    .await?;
                let version = to_version(max.unwrap_or(0) + 1)?;
                // Material first, state second: the database never names a version whose
                // material was not written. If the commit fails, the material is an orphan
                // that the next rotation to this number replaces.
                if let Err(reason) = provision(version) {
                    tx.rollback().await?;
                    return Err(StoreError::KeyProvider(reason));
                }
                sqlx::query(queries::SET_KEY_VERSION_STATE)
                    .bind(kind)
                    .bind(i64::from(active))
                    .bind("DECRYPT_ONLY")
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(queries::INSERT_KEY_VERSION)
                    .bind(kind)
                    .bind(i64::from(version))
                    .bind("ACTIVE")
                    .bind(provider)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(Rotation::Rotated {
                    version,
                    previous: active,
                })
            }

            async fn retire_key_version(
                &self,
                kind: &str,
                version: u32,
                now: $crate::store::Micros,
            ) -> Result<$crate::store::KeyVersionRow, $crate::store::StoreError> {
                use $crate::store::{queries, StoreError};
                let mut tx = self.begin_write().await?;
                sqlx::query(Self::LOCK_KEY_ADMIN)
                    .bind(kind)
                    .fetch_optional(&mut *tx)
                    .await?;
                let state = key_version_state(&mut tx, kind, version).await?;
                if state != "DECRYPT_ONLY" {
                    tx.rollback().await?;
                    return Err(StoreError::KeyVersionState { version, state });
                }
                // The rotation that made this version decrypt-only waited for every write
                // in flight under it (they hold a share lock on its row), and no write
                // passes the active check since: this count cannot grow afterwards.
                let count = if kind == "index" {
                    queries::COUNT_UNDER_INDEX_VERSION
                } else {
                    queries::COUNT_UNDER_KEK_VERSION
                };
                let records: i64 = sqlx::query_scalar(count)
                    .bind(i64::from(version))
                    .fetch_one(&mut *tx)
                    .await?;
                if records > 0 {
                    tx.rollback().await?;
                    return Err(StoreError::KeyVersionInUse { version, records });
                }
                sqlx::query(queries::RETIRE_KEY_VERSION)
                    .bind(kind)
                    .bind(i64::from(version))
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                self.key_version(kind, version).await
            }

            async fn destroy_key_version(
                &self,
                kind: &str,
                version: u32,
                now: $crate::store::Micros,
                destroy: &$crate::store::ProvisionFn<'_>,
            ) -> Result<$crate::store::KeyVersionRow, $crate::store::StoreError> {
                use $crate::store::{queries, StoreError};
                let mut tx = self.begin_write().await?;
                sqlx::query(Self::LOCK_KEY_ADMIN)
                    .bind(kind)
                    .fetch_optional(&mut *tx)
                    .await?;
                let state = key_version_state(&mut tx, kind, version).await?;
                if state != "RETIRED" {
                    tx.rollback().await?;
                    return Err(StoreError::KeyVersionState { version, state });
                }
                if let Err(reason) = destroy(version) {
                    tx.rollback().await?;
                    return Err(StoreError::KeyProvider(reason));
                }
                sqlx::query(queries::DESTROY_KEY_VERSION)
                    .bind(kind)
                    .bind(i64::from(version))
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                self.key_version(kind, version).await
            }

            async fn start_rewrap_job(
                &self,
                job_id: &str,
                target: u32,
                owner: &$crate::store::JobOwner,
                now: $crate::store::Micros,
                lease_until: $crate::store::Micros,
            ) -> Result<(), $crate::store::StoreError> {
                sqlx::query($crate::store::queries::INSERT_REWRAP_JOB)
                    .bind(job_id)
                    .bind(i64::from(target))
                    .bind(now)
                    .bind(owner.instance.as_deref())
                    .bind(owner.process.as_str())
                    .bind(lease_until)
                    .execute(&self.pool)
                    .await?;
                Ok(())
            }

            async fn renew_rewrap_lease(
                &self,
                job_id: &str,
                lease_until: $crate::store::Micros,
            ) -> Result<bool, $crate::store::StoreError> {
                let done = sqlx::query($crate::store::queries::RENEW_REWRAP_LEASE)
                    .bind(job_id)
                    .bind(lease_until)
                    .execute(&self.pool)
                    .await?;
                Ok(done.rows_affected() > 0)
            }

            async fn interrupt_abandoned_jobs(
                &self,
                me: &$crate::store::JobOwner,
                now: $crate::store::Micros,
                legacy_lease: $crate::store::Micros,
            ) -> Result<u64, $crate::store::StoreError> {
                let done = sqlx::query($crate::store::queries::INTERRUPT_ABANDONED_JOBS)
                    .bind(now)
                    .bind(legacy_lease)
                    .bind(me.instance.as_deref())
                    .bind(me.process.as_str())
                    .execute(&self.pool)
                    .await?;
                Ok(done.rows_affected())
            }

            async fn rewrap_jobs(
                &self,
                limit: i64,
            ) -> Result<Vec<$crate::store::RewrapJobRow>, $crate::store::StoreError> {
                use sqlx::Row;
                let rows = sqlx::query($crate::store::queries::SELECT_REWRAP_JOBS)
                    .bind(limit)
                    .fetch_all(&self.pool)
                    .await?;
                rows.iter()
                    .map(|row| {
                        Ok($crate::store::RewrapJobRow {
                            job_id: row.try_get("job_id")?,
                            state: row.try_get("state")?,
                            target_version: row.try_get("target_version")?,
                            target_index_version: row.try_get("target_index_version")?,
                            started_at: row.try_get("started_at")?,
                            updated_at: row.try_get("updated_at")?,
                            rewrapped: row.try_get("rewrapped")?,
                            reindexed: row.try_get("reindexed")?,
                            failed: row.try_get("failed")?,
                            owner_instance: row.try_get("owner_instance")?,
                        })
                    })
                    .collect()
            }

            async fn rewrap_batch(
                &self,
                job_id: &str,
                target: u32,
                after: &str,
                limit: i64,
                now: $crate::store::Micros,
                rewrap: &$crate::store::RewrapFn<'_>,
            ) -> Result<$crate::store::RewrapBatch, $crate::store::StoreError> {
                use sqlx::Row;
                use $crate::store::{queries, RewrapBatch};
                let mut tx = self.begin_write().await?;
                if !kek_writable(&mut tx, target).await? {
                    tx.rollback().await?;
                    return Ok(RewrapBatch {
                        target_inactive: true,
                        ..RewrapBatch::default()
                    });
                }
                let rows = sqlx::query(Self::SELECT_REWRAP_BATCH)
                    .bind(i64::from(target))
                    .bind(after)
                    .bind(limit)
                    .fetch_all(&mut *tx)
                    .await?;
                let mut batch = RewrapBatch {
                    selected: rows.len(),
                    ..RewrapBatch::default()
                };
                for row in &rows {
                    let record_id: String = row.try_get("record_id")?;
                    let wrapped: Vec<u8> = row.try_get("wrapped_key")?;
                    match rewrap(&record_id, &wrapped) {
                        Some(rewrapped) => {
                            let changed = sqlx::query(queries::REWRAP_RECORD)
                                .bind(&record_id)
                                .bind(&rewrapped)
                                .bind(i64::from(target))
                                .bind(&wrapped)
                                .execute(&mut *tx)
                                .await?
                                .rows_affected();
                            batch.rewrapped += changed;
                        }
                        None => batch.failed += 1,
                    }
                    batch.last_record_id = Some(record_id);
                }
                sqlx::query(queries::ADVANCE_REWRAP_JOB)
                    .bind(job_id)
                    .bind(batch.rewrapped as i64)
                    .bind(batch.failed as i64)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(batch)
            }

            async fn reindex_batch(
                &self,
                job_id: &str,
                target: u32,
                after: &str,
                limit: i64,
                now: $crate::store::Micros,
                reindex: &$crate::store::ReindexFn<'_>,
            ) -> Result<$crate::store::RewrapBatch, $crate::store::StoreError> {
                use sqlx::Row;
                use $crate::store::{queries, ReindexRow, RewrapBatch, SealedField};
                let mut tx = self.begin_write().await?;
                let active: Option<i64> = sqlx::query_scalar(<$store>::LOCK_ACTIVE_INDEX)
                    .bind(i64::from(target))
                    .fetch_optional(&mut *tx)
                    .await?;
                if active.is_none() {
                    tx.rollback().await?;
                    return Ok(RewrapBatch {
                        target_inactive: true,
                        ..RewrapBatch::default()
                    });
                }
                let rows = sqlx::query(Self::SELECT_REINDEX_BATCH)
                    .bind(i64::from(target))
                    .bind(after)
                    .bind(limit)
                    .fetch_all(&mut *tx)
                    .await?;
                let mut batch = RewrapBatch {
                    selected: rows.len(),
                    ..RewrapBatch::default()
                };
                for row in &rows {
                    let record_id: String = row.try_get("record_id")?;
                    let version: i64 = row.try_get("version")?;
                    let index_version: i64 = row.try_get("index_version")?;
                    let wrapped_key: Option<Vec<u8>> = row.try_get("wrapped_key")?;
                    let fields: Vec<(String, Vec<u8>)> =
                        sqlx::query_as(queries::SELECT_INDEXED_FIELDS)
                            .bind(&record_id)
                            .fetch_all(&mut *tx)
                            .await?;
                    let input = ReindexRow {
                        record_id: record_id.clone(),
                        index_version: to_version(index_version)?,
                        wrapped_key: wrapped_key.unwrap_or_default(),
                        fields: fields
                            .into_iter()
                            .map(|(field, ciphertext)| SealedField { field, ciphertext })
                            .collect(),
                        age_gate: row.try_get("age_gate")?,
                    };
                    match reindex(&input) {
                        Some(done) => {
                            let changed = sqlx::query(queries::REINDEX_RECORD)
                                .bind(&record_id)
                                .bind(&done.document_index)
                                .bind(&done.phone_index)
                                .bind(&done.age_gate)
                                .bind(i64::from(target))
                                .bind(version)
                                .bind(index_version)
                                .execute(&mut *tx)
                                .await?
                                .rows_affected();
                            batch.rewrapped += changed;
                        }
                        None => batch.failed += 1,
                    }
                    batch.last_record_id = Some(record_id);
                }
                sqlx::query(queries::ADVANCE_REINDEX_JOB)
                    .bind(job_id)
                    .bind(batch.rewrapped as i64)
                    .bind(batch.failed as i64)
                    .bind(now)
                    .bind(i64::from(target))
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(batch)
            }

            async fn count_index_older_than(
                &self,
                target: u32,
            ) -> Result<i64, $crate::store::StoreError> {
                Ok(sqlx::query_scalar($crate::store::queries::COUNT_INDEX_OLDER_THAN)
                    .bind(i64::from(target))
                    .fetch_one(&self.pool)
                    .await?)
            }

            async fn count_older_than(
                &self,
                target: u32,
            ) -> Result<i64, $crate::store::StoreError> {
                Ok(sqlx::query_scalar($crate::store::queries::COUNT_OLDER_THAN)
                    .bind(i64::from(target))
                    .fetch_one(&self.pool)
                    .await?)
            }

            async fn finish_rewrap_job(
                &self,
                job_id: &str,
                state: &str,
                now: $crate::store::Micros,
            ) -> Result<(), $crate::store::StoreError> {
                sqlx::query($crate::store::queries::FINISH_REWRAP_JOB)
                    .bind(job_id)
                    .bind(state)
                    .bind(now)
                    .execute(&self.pool)
                    .await?;
                Ok(())
            }

            async fn rekey_record(
                &self,
                rekey: $crate::store::RecordRekey,
                audit: &$crate::store::AuditEvent,
            ) -> Result<$crate::store::RecordMeta, $crate::store::StoreError> {
                use $crate::store::{queries, RecordMeta, StoreError};
                let mut tx = self.begin_write().await?;
                if !kek_writable(&mut tx, rekey.kek_version).await? {
                    tx.rollback().await?;
                    return Err(StoreError::StaleKeyVersion(rekey.kek_version));
                }
                let created_at: Option<i64> = sqlx::query_scalar(queries::REKEY_RECORD)
                    .bind(&rekey.record_id)
                    .bind(rekey.expected_version)
                    .bind(rekey.updated_at)
                    .bind(&rekey.wrapped_key)
                    .bind(i64::from(rekey.kek_version))
                    .fetch_optional(&mut *tx)
                    .await?;
                let Some(created_at) = created_at else {
                    tx.rollback().await?;
                    return match self.account_state(&rekey.record_id).await? {
                        Some(state) if !state.deleted => Err(StoreError::VersionConflict),
                        _ => Err(StoreError::NotFound),
                    };
                };
                // The record's row is locked now: a write sealing under its key waits for
                // this transaction (see `record_key_is`). Every other ciphertext bound to the
                // record moves with the fields, or nothing does.
                let mut moved: i64 = 0;
                let pairs = rekey.bound.notes.iter().zip(&rekey.resealed.notes);
                for ((event_id, old), (_, new)) in pairs {
                    moved += sqlx::query(queries::RESEAL_NOTE)
                        .bind(event_id)
                        .bind(new)
                        .bind(old)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected() as i64;
                }
                let pairs = rekey.bound.guardians.iter().zip(&rekey.resealed.guardians);
                for ((consent_id, old), (_, new)) in pairs {
                    moved += sqlx::query(queries::RESEAL_GUARDIAN)
                        .bind(consent_id)
                        .bind(new)
                        .bind(old)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected() as i64;
                }
                let bound: i64 = sqlx::query_scalar(queries::COUNT_BOUND)
                    .bind(&rekey.record_id)
                    .fetch_one(&mut *tx)
                    .await?;
                let expected = (rekey.resealed.notes.len() + rekey.resealed.guardians.len()) as i64;
                if moved != expected || bound != expected {
                    tx.rollback().await?;
                    return Err(StoreError::VersionConflict);
                }
                sqlx::query(queries::DELETE_FIELDS)
                    .bind(&rekey.record_id)
                    .execute(&mut *tx)
                    .await?;
                for field in &rekey.fields {
                    sqlx::query(queries::INSERT_FIELD)
                        .bind(&rekey.record_id)
                        .bind(&field.field)
                        .bind(&field.ciphertext)
                        .execute(&mut *tx)
                        .await?;
                }
                insert_audit_events(&mut *tx, std::slice::from_ref(audit)).await?;
                tx.commit().await?;
                Ok(RecordMeta {
                    record_id: rekey.record_id,
                    version: rekey.expected_version + 1,
                    created_at,
                    updated_at: rekey.updated_at,
                    present_fields: $crate::store::present_fields(&rekey.fields),
                })
            }

            async fn expired_records(
                &self,
                now: $crate::store::Micros,
                limit: i64,
            ) -> Result<Vec<String>, $crate::store::StoreError> {
                Ok(sqlx::query_scalar($crate::store::queries::SELECT_EXPIRED)
                    .bind(now)
                    .bind(limit)
                    .fetch_all(&self.pool)
                    .await?)
            }

            async fn rewrap_job(
                &self,
                job_id: &str,
            ) -> Result<Option<(i64, i64, String)>, $crate::store::StoreError> {
                use sqlx::Row;
                let row = sqlx::query($crate::store::queries::SELECT_REWRAP_JOB)
                    .bind(job_id)
                    .fetch_optional(&self.pool)
                    .await?;
                row.map(|row| {
                    Ok((
                        row.try_get("rewrapped")?,
                        row.try_get("failed")?,
                        row.try_get("state")?,
                    ))
                })
                .transpose()
            }
        }

        impl $store {
            async fn key_version(
                &self,
                kind: &str,
                version: u32,
            ) -> Result<$crate::store::KeyVersionRow, $crate::store::StoreError> {
                $crate::store::Store::key_versions(self, kind)
                    .await?
                    .into_iter()
                    .find(|row| row.version == version)
                    .ok_or($crate::store::StoreError::NotFound)
            }

            /// A create's transaction on sqlx. The inner `Err` is a refusal (stale key or index
            /// version, duplicate document) with nothing written.
            async fn try_insert_record(
                &self,
                record: &$crate::store::NewRecord,
                request: Option<&$crate::store::CreateRequestKey>,
                audit: &$crate::audit::AuditEvent,
            ) -> Result<Result<(), $crate::store::StoreError>, $crate::store::StoreError> {
                use $crate::store::{queries, StoreError};
                let mut tx = self.begin_write().await?;
                if !kek_writable(&mut tx, record.kek_version).await? {
                    tx.rollback().await?;
                    return Ok(Err(StoreError::StaleKeyVersion(record.kek_version)));
                }
                if let Some(refused) =
                    index_writable(&mut tx, &record.record_id, &record.indexes).await?
                {
                    tx.rollback().await?;
                    return Ok(Err(refused));
                }
                let inserted = async {
                    sqlx::query(queries::INSERT_RECORD)
                        .bind(&record.record_id)
                        .bind(record.created_at)
                        .bind(&record.wrapped_key)
                        .bind(i64::from(record.kek_version))
                        .bind(&record.indexes.document)
                        .bind(&record.indexes.phone)
                        .bind(&record.age_gate)
                        .bind(&record.policy_version)
                        .bind(record.retain_until)
                        .bind(i64::from(record.indexes.version))
                        .execute(&mut *tx)
                        .await?;
                    for field in &record.fields {
                        sqlx::query(queries::INSERT_FIELD)
                            .bind(&record.record_id)
                            .bind(&field.field)
                            .bind(&field.ciphertext)
                            .execute(&mut *tx)
                            .await?;
                    }
                    if let Some(request) = request {
                        sqlx::query(queries::DELETE_EXPIRED_CREATE_REQUEST)
                            .bind(&request.caller)
                            .bind(&request.request_id)
                            .bind(request.expired_before)
                            .execute(&mut *tx)
                            .await?;
                        sqlx::query(queries::INSERT_CREATE_REQUEST)
                            .bind(&request.caller)
                            .bind(&request.request_id)
                            .bind(&record.record_id)
                            .bind(&request.fingerprint)
                            .bind(record.created_at)
                            .execute(&mut *tx)
                            .await?;
                    }
                    insert_audit_events(&mut *tx, std::slice::from_ref(audit)).await?;
                    Ok::<(), sqlx::Error>(())
                }
                .await;
                match inserted {
                    Ok(()) => {
                        tx.commit().await?;
                        Ok(Ok(()))
                    }
                    Err(error) if is_unique_violation(&error) => {
                        tx.rollback().await?;
                        Ok(Err(StoreError::DuplicateDocument))
                    }
                    Err(error) => Err(error.into()),
                }
            }

            /// The record an earlier create with the same request key made, if any.
            async fn replayed_request(
                &self,
                request: &$crate::store::CreateRequestKey,
            ) -> Result<Option<$crate::store::InsertOutcome>, $crate::store::StoreError> {
                use sqlx::Row;
                let Some(row) = sqlx::query($crate::store::queries::SELECT_CREATE_REQUEST)
                    .bind(&request.caller)
                    .bind(&request.request_id)
                    .bind(request.expired_before)
                    .fetch_optional(&self.pool)
                    .await?
                else {
                    return Ok(None);
                };
                let record_id: String = row.try_get("record_id")?;
                let deleted_at: Option<i64> = row.try_get("deleted_at")?;
                let fingerprint: Option<Vec<u8>> = row.try_get("fingerprint")?;
                let (None, Some(fingerprint)) = (deleted_at, fingerprint) else {
                    return Ok(Some($crate::store::InsertOutcome::ReplayedDeleted));
                };
                let same_request = std::iter::once(&request.fingerprint)
                    .chain(&request.fingerprint_elsewhere)
                    .any(|candidate| {
                        subtle::ConstantTimeEq::ct_eq(fingerprint.as_slice(), candidate.as_slice())
                            .into()
                    });
                let meta = self.meta(&record_id).await?;
                Ok(Some($crate::store::InsertOutcome::Replayed { meta, same_request }))
            }

            async fn find_by_index(
                &self,
                column: &str,
                indexes: &[Vec<u8>],
            ) -> Result<Vec<$crate::store::LookupMatch>, $crate::store::StoreError> {
                if let Some(direct) = self.direct() {
                    return direct.find_by_index(column, indexes);
                }
                if indexes.is_empty() {
                    return Ok(Vec::new());
                }
                let sql = $crate::store::queries::find_by_index(column, indexes.len());
                let mut query = sqlx::query(&sql);
                for index in indexes {
                    query = query.bind(index);
                }
                let rows = query.fetch_all(&self.pool).await?;
                rows.iter().map(decode_match).collect()
            }

            async fn meta(
                &self,
                record_id: &str,
            ) -> Result<$crate::store::RecordMeta, $crate::store::StoreError> {
                use sqlx::Row;
                let row = sqlx::query($crate::store::queries::SELECT_META)
                    .bind(record_id)
                    .fetch_optional(&self.pool)
                    .await?
                    .ok_or($crate::store::StoreError::NotFound)?;
                let present_fields: Vec<String> =
                    sqlx::query_scalar($crate::store::queries::SELECT_FIELD_NAMES)
                        .bind(record_id)
                        .fetch_all(&self.pool)
                        .await?;
                Ok($crate::store::RecordMeta {
                    record_id: record_id.to_owned(),
                    version: row.try_get("version")?,
                    created_at: row.try_get("created_at")?,
                    updated_at: row.try_get("updated_at")?,
                    present_fields,
                })
            }
        }

        /// Appends events to their chain inside the caller's transaction: reserves sequence
        /// numbers on the chain's head row (which stays locked until commit), links each
        /// event to its predecessor, and moves the head.
        async fn insert_audit_events(
            conn: &mut <<$store as $crate::store::shared::Backend>::Db as sqlx::Database>::Connection,
            events: &[$crate::audit::AuditEvent],
        ) -> Result<(), sqlx::Error> {
            use sqlx::Row;
            let Some(first) = events.first() else {
                return Ok(());
            };
            let chain_id = &first.chain_id;
            debug_assert!(events.iter().all(|e| &e.chain_id == chain_id));
            let head = sqlx::query($crate::store::queries::ADVANCE_CHAIN)
                .bind(chain_id)
                .bind(events.len() as i64)
                .fetch_one(&mut *conn)
                .await?;
            let head_seq: i64 = head.try_get("head_seq")?;
            let head_hash: Vec<u8> = head.try_get("head_hash")?;
            let first_seq = head_seq - events.len() as i64 + 1;
            // Link every event first, then write them a chunk per statement.
            let mut hashes: Vec<Vec<u8>> = Vec::with_capacity(events.len());
            for (seq, event) in (first_seq..).zip(events) {
                let prev = hashes.last().unwrap_or(&head_hash);
                let hash = $crate::audit::link(event, seq, prev).to_vec();
                hashes.push(hash);
            }
            let mut done = 0;
            while done < events.len() {
                let left = events.len() - done;
                let rows = if left >= $crate::store::queries::AUDIT_INSERT_MAX_ROWS {
                    $crate::store::queries::AUDIT_INSERT_MAX_ROWS
                } else {
                    1 << left.ilog2()
                };
                let mut insert = sqlx::query($crate::store::queries::insert_audit_events(rows));
                for i in done..done + rows {
                    let event = &events[i];
                    let prev_hash = if i == 0 { &head_hash } else { &hashes[i - 1] };
                    insert = insert
                        .bind(chain_id)
                        .bind(first_seq + i as i64)
                        .bind(&event.event_id)
                        .bind(event.occurred_at)
                        .bind(&event.caller)
                        .bind(&event.peer)
                        .bind(&event.rpc)
                        .bind(event.subject())
                        .bind($crate::store::encode_json_list(&event.record_ids))
                        .bind(&event.purpose)
                        .bind(&event.justification)
                        .bind($crate::store::encode_json_list(&event.released))
                        .bind(i64::from(event.released_plaintext()))
                        .bind(&event.outcome)
                        .bind(&event.reason)
                        .bind(&event.request_id)
                        .bind(&event.trace_id)
                        .bind(prev_hash)
                        .bind(&hashes[i]);
                }
                insert.execute(&mut *conn).await?;
                done += rows;
            }
            for (seq, event) in (first_seq..).zip(events) {
                if event.record_ids.len() < 2 {
                    continue;
                }
                for record_id in &event.record_ids {
                    sqlx::query($crate::store::queries::INSERT_EVENT_RECORD)
                        .bind(record_id)
                        .bind(event.occurred_at)
                        .bind(chain_id)
                        .bind(seq)
                        .execute(&mut *conn)
                        .await?;
                }
            }
            let new_head = hashes.last().unwrap_or(&head_hash);
            sqlx::query($crate::store::queries::SET_CHAIN_HASH)
                .bind(chain_id)
                .bind(new_head)
                .execute(&mut *conn)
                .await?;
            Ok(())
        }

        async fn insert_account_event(
            conn: &mut <<$store as $crate::store::shared::Backend>::Db as sqlx::Database>::Connection,
            event: &$crate::store::AccountEventRow,
        ) -> Result<(), sqlx::Error> {
            sqlx::query($crate::store::queries::INSERT_ACCOUNT_EVENT)
                .bind(&event.event_id)
                .bind(&event.record_id)
                .bind(event.occurred_at)
                .bind(&event.kind)
                .bind(&event.actor)
                .bind(&event.reason)
                .bind(&event.note)
                .bind(&event.ticket)
                .bind(&event.consent_id)
                .execute(conn)
                .await?;
            Ok(())
        }

        fn decode_account(
            row: &<<$store as $crate::store::shared::Backend>::Db as sqlx::Database>::Row,
        ) -> Result<$crate::store::AccountState, $crate::store::StoreError> {
            use sqlx::Row;
            let deleted_at: Option<i64> = row.try_get("deleted_at")?;
            let suspended_at: Option<i64> = row.try_get("suspended_at")?;
            Ok($crate::store::AccountState {
                deleted: deleted_at.is_some(),
                suspended: suspended_at.is_some(),
                age_gate: row.try_get("age_gate")?,
                index_version: to_version(row.try_get("index_version")?)?,
                policy_version: row.try_get("policy_version")?,
                active_consents: row.try_get("active_consents")?,
            })
        }

        fn decode_match(
            row: &<<$store as $crate::store::shared::Backend>::Db as sqlx::Database>::Row,
        ) -> Result<$crate::store::LookupMatch, $crate::store::StoreError> {
            use sqlx::Row;
            Ok($crate::store::LookupMatch {
                record_id: row.try_get("record_id")?,
                account: decode_account(row)?,
            })
        }

        fn decode_event(
            row: &<<$store as $crate::store::shared::Backend>::Db as sqlx::Database>::Row,
        ) -> Result<$crate::audit::StoredEvent, $crate::store::StoreError> {
            use sqlx::Row;
            let corrupt = |what: &str| $crate::store::StoreError::Corrupt(format!("audit event {what}"));
            let record_ids: String = row.try_get("record_ids")?;
            let released: String = row.try_get("released")?;
            Ok($crate::audit::StoredEvent {
                event: $crate::audit::AuditEvent {
                    event_id: row.try_get("event_id")?,
                    occurred_at: row.try_get("occurred_at")?,
                    chain_id: row.try_get("chain_id")?,
                    caller: row.try_get("caller")?,
                    peer: row.try_get("peer")?,
                    rpc: row.try_get("rpc")?,
                    record_ids: serde_json::from_str(&record_ids).map_err(|_| corrupt("record_ids"))?,
                    purpose: row.try_get("purpose")?,
                    justification: row.try_get("justification")?,
                    released: serde_json::from_str(&released).map_err(|_| corrupt("released"))?,
                    outcome: row.try_get("outcome")?,
                    reason: row.try_get("reason")?,
                    request_id: row.try_get("request_id")?,
                    trace_id: row.try_get("trace_id")?,
                },
                seq: row.try_get("seq")?,
                prev_hash: row.try_get("prev_hash")?,
                hash: row.try_get("hash")?,
            })
        }

        /// A checkpoint row of either format. A format this build does not know is refused
        /// rather than read as an older one.
        fn decode_checkpoint(
            row: &<<$store as $crate::store::shared::Backend>::Db as sqlx::Database>::Row,
        ) -> Result<$crate::audit::Checkpoint, $crate::store::StoreError> {
            use sqlx::Row;
            use $crate::store::StoreError;
            let id: i64 = row.try_get("id")?;
            let corrupt = |what: &str| StoreError::Corrupt(format!("checkpoint {id}: {what}"));
            let heads: String = row.try_get("heads")?;
            let format: i32 = row.try_get("format")?;
            let link = match format {
                1 => None,
                2 => {
                    let closed: Option<String> = row.try_get("closed")?;
                    Some($crate::audit::CheckpointLink {
                        signer: row
                            .try_get::<Option<String>, _>("signer_id")?
                            .ok_or_else(|| corrupt("format 2 without a signer"))?,
                        counter: row
                            .try_get::<Option<i64>, _>("counter")?
                            .ok_or_else(|| corrupt("format 2 without a counter"))?,
                        key_id: row.try_get::<Option<String>, _>("key_id")?.unwrap_or_default(),
                        prev: row.try_get::<Option<Vec<u8>>, _>("prev_hash")?.unwrap_or_default(),
                        closed: match closed {
                            Some(text) => {
                                serde_json::from_str(&text).map_err(|_| corrupt("closed"))?
                            }
                            None => Vec::new(),
                        },
                    })
                }
                _ => return Err(corrupt("unknown format")),
            };
            Ok($crate::audit::Checkpoint {
                id,
                created_at: row.try_get("created_at")?,
                heads: serde_json::from_str(&heads).map_err(|_| corrupt("heads"))?,
                signature: row.try_get("signature")?,
                link,
            })
        }

        /// Whether `version` is still the active KEK, locking its row (see the backend) so
        /// that it stays active until this transaction ends.
        async fn kek_writable(
            tx: &mut sqlx::Transaction<'static, <$store as $crate::store::shared::Backend>::Db>,
            version: u32,
        ) -> Result<bool, sqlx::Error> {
            let found: Option<i64> = sqlx::query_scalar(<$store>::LOCK_ACTIVE_KEK)
                .bind(i64::from(version))
                .fetch_optional(&mut **tx)
                .await?;
            Ok(found.is_some())
        }

        /// Whether the live record `record_id` still has the wrapped data key `sealed_under`
        /// (`None`: nothing to check), locking its row (see the backend) so that no re-key
        /// commits before this transaction ends: what the caller sealed under that key stays
        /// openable, or the write is refused.
        async fn record_key_is(
            tx: &mut sqlx::Transaction<'static, <$store as $crate::store::shared::Backend>::Db>,
            record_id: &str,
            sealed_under: Option<&[u8]>,
        ) -> Result<bool, sqlx::Error> {
            let Some(wrapped_key) = sealed_under else {
                return Ok(true);
            };
            let found = sqlx::query(<$store>::LOCK_RECORD_KEY)
                .bind(record_id)
                .bind(wrapped_key)
                .fetch_optional(&mut **tx)
                .await?;
            Ok(found.is_some())
        }

        /// Whether a write's blind indexes may be stored, inside its transaction: its index
        /// version is still the active one (its row locked in share mode, so no rotation
        /// commits before this transaction ends), no other version is live that the write
        /// did not compute for, and no other live record holds the document under another
        /// live version. `Some` is the refusal.
        async fn index_writable(
            tx: &mut sqlx::Transaction<'static, <$store as $crate::store::shared::Backend>::Db>,
            record_id: &str,
            indexes: &$crate::store::RecordIndexes,
        ) -> Result<Option<$crate::store::StoreError>, sqlx::Error> {
            use $crate::store::StoreError;
            let stale = Some(StoreError::StaleIndexVersion(indexes.version));
            let active: Option<i64> = sqlx::query_scalar(<$store>::LOCK_ACTIVE_INDEX)
                .bind(i64::from(indexes.version))
                .fetch_optional(&mut **tx)
                .await?;
            if active.is_none() {
                return Ok(stale);
            }
            let live: Vec<i64> =
                sqlx::query_scalar($crate::store::queries::SELECT_LIVE_INDEX_VERSIONS)
                    .fetch_all(&mut **tx)
                    .await?;
            if live.iter().any(|version| {
                u32::try_from(*version).map_or(true, |v| !indexes.computed_for.contains(&v))
            }) {
                return Ok(stale);
            }
            if indexes.document.is_none() || indexes.document_elsewhere.is_empty() {
                return Ok(None);
            }
            let sql = $crate::store::queries::document_held_elsewhere(indexes.document_elsewhere.len());
            let mut query = sqlx::query_scalar::<_, i64>(&sql).bind(record_id);
            for index in &indexes.document_elsewhere {
                query = query.bind(index);
            }
            let held = query.fetch_one(&mut **tx).await?;
            Ok((held > 0).then_some(StoreError::DuplicateDocument))
        }

        async fn key_version_state(
            tx: &mut sqlx::Transaction<'static, <$store as $crate::store::shared::Backend>::Db>,
            kind: &str,
            version: u32,
        ) -> Result<String, $crate::store::StoreError> {
            let state: Option<String> =
                sqlx::query_scalar($crate::store::queries::SELECT_KEY_VERSION_STATE)
                    .bind(kind)
                    .bind(i64::from(version))
                    .fetch_optional(&mut **tx)
                    .await?;
            state.ok_or($crate::store::StoreError::NotFound)
        }

        fn key_version_row(
            row: &<<$store as $crate::store::shared::Backend>::Db as sqlx::Database>::Row,
        ) -> Result<$crate::store::KeyVersionRow, $crate::store::StoreError> {
            use sqlx::Row;
            Ok($crate::store::KeyVersionRow {
                version: to_version(row.try_get("version")?)?,
                state: row.try_get("state")?,
                provider: row.try_get("provider")?,
                created_at: row.try_get("created_at")?,
                records: row.try_get("records")?,
            })
        }

        fn to_version(value: i64) -> Result<u32, $crate::store::StoreError> {
            u32::try_from(value).map_err(|_| {
                $crate::store::StoreError::Corrupt(format!("key version {value} out of range"))
            })
        }

        fn is_unique_violation(error: &sqlx::Error) -> bool {
            error
                .as_database_error()
                .is_some_and(|e| e.is_unique_violation())
        }
    };
}

pub(crate) use impl_store;

/// Names the sqlx database type of a backend struct, so the shared code can spell its
/// connection type.
pub trait Backend {
    type Db: sqlx::Database;
}
