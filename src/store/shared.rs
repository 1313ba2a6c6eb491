//! The [`Store`](super::Store) logic both backends share, written once.
//!
//! sqlx gives each backend its own concrete types (`Pool<Sqlite>`, `Pool<Postgres>`), and a
//! generic implementation over `sqlx::Database` drowns in trait bounds. Instead each backend
//! module defines its struct with a `pool` field and inherent `begin_write` and `migrator`
//! methods (the parts that really differ: SQLite takes its write lock up front with
//! `BEGIN IMMEDIATE`), then expands [`impl_store!`] to get the trait implementation.

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
                audit: &$crate::store::AuditEvent,
            ) -> Result<$crate::store::InsertOutcome, $crate::store::StoreError> {
                use $crate::store::{queries, InsertOutcome, RecordMeta, StoreError};
                if let Some(request) = &request {
                    if let Some(outcome) = self.replayed_request(request).await? {
                        return Ok(outcome);
                    }
                }
                let mut tx = self.begin_write().await?;
                if !kek_writable(&mut tx, record.kek_version).await? {
                    tx.rollback().await?;
                    return Err(StoreError::StaleKeyVersion(record.kek_version));
                }
                let inserted = async {
                    sqlx::query(queries::INSERT_RECORD)
                        .bind(&record.record_id)
                        .bind(record.created_at)
                        .bind(&record.wrapped_key)
                        .bind(i64::from(record.kek_version))
                        .bind(&record.document_index)
                        .bind(&record.phone_index)
                        .bind(record.retain_until)
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
                    if let Some(request) = &request {
                        sqlx::query(queries::INSERT_CREATE_REQUEST)
                            .bind(&request.caller)
                            .bind(&request.request_id)
                            .bind(&record.record_id)
                            .bind(&request.fingerprint)
                            .bind(record.created_at)
                            .execute(&mut *tx)
                            .await?;
                    }
                    insert_audit_event(&mut *tx, audit).await?;
                    Ok::<(), sqlx::Error>(())
                }
                .await;
                match inserted {
                    Ok(()) => {
                        tx.commit().await?;
                        Ok(InsertOutcome::Inserted(RecordMeta {
                            record_id: record.record_id,
                            version: 1,
                            created_at: record.created_at,
                            updated_at: record.created_at,
                            present_fields: $crate::store::present_fields(&record.fields),
                        }))
                    }
                    Err(error) if is_unique_violation(&error) => {
                        tx.rollback().await?;
                        // Either a concurrent retry of the same request won the race, or
                        // the document belongs to a live record already.
                        if let Some(request) = &request {
                            if let Some(outcome) = self.replayed_request(request).await? {
                                return Ok(outcome);
                            }
                        }
                        Err(StoreError::DuplicateDocument)
                    }
                    Err(error) => Err(error.into()),
                }
            }

            async fn get_record(
                &self,
                record_id: &str,
            ) -> Result<Option<$crate::store::StoredRecord>, $crate::store::StoreError> {
                use sqlx::Row;
                use $crate::store::{queries, RecordMeta, SealedField, StoredRecord};
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
                }))
            }

            async fn update_record(
                &self,
                update: $crate::store::RecordUpdate,
                audit: &$crate::store::AuditEvent,
            ) -> Result<$crate::store::RecordMeta, $crate::store::StoreError> {
                use $crate::store::{queries, RecordMeta, StoreError};
                let mut tx = self.begin_write().await?;
                let updated = async {
                    let created_at: Option<i64> = sqlx::query_scalar(queries::UPDATE_RECORD)
                        .bind(&update.record_id)
                        .bind(update.expected_version)
                        .bind(update.updated_at)
                        .bind(&update.document_index)
                        .bind(&update.phone_index)
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
                    insert_audit_event(&mut *tx, audit).await?;
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
                        match self.record_state(&update.record_id).await? {
                            Some($crate::store::RecordState::Active) => {
                                Err(StoreError::VersionConflict)
                            }
                            _ => Err(StoreError::NotFound),
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
                audit: &$crate::store::AuditEvent,
            ) -> Result<(), $crate::store::StoreError> {
                use $crate::store::{queries, StoreError};
                let mut tx = self.begin_write().await?;
                let shredded = sqlx::query(queries::SHRED_RECORD)
                    .bind(record_id)
                    .bind(deleted_at)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                if shredded == 0 {
                    tx.rollback().await?;
                    return Err(StoreError::NotFound);
                }
                sqlx::query(queries::DELETE_FIELDS)
                    .bind(record_id)
                    .execute(&mut *tx)
                    .await?;
                insert_audit_event(&mut *tx, audit).await?;
                tx.commit().await?;
                Ok(())
            }

            async fn find_by_document(
                &self,
                index: &[u8],
            ) -> Result<Vec<String>, $crate::store::StoreError> {
                Ok(sqlx::query_scalar($crate::store::queries::FIND_BY_DOCUMENT)
                    .bind(index)
                    .fetch_all(&self.pool)
                    .await?)
            }

            async fn find_by_phone(
                &self,
                index: &[u8],
            ) -> Result<Vec<String>, $crate::store::StoreError> {
                Ok(sqlx::query_scalar($crate::store::queries::FIND_BY_PHONE)
                    .bind(index)
                    .fetch_all(&self.pool)
                    .await?)
            }

            async fn record_state(
                &self,
                record_id: &str,
            ) -> Result<Option<$crate::store::RecordState>, $crate::store::StoreError> {
                use $crate::store::RecordState;
                let deleted_at: Option<Option<i64>> =
                    sqlx::query_scalar($crate::store::queries::SELECT_STATE)
                        .bind(record_id)
                        .fetch_optional(&self.pool)
                        .await?;
                Ok(deleted_at.map(|deleted_at| match deleted_at {
                    None => RecordState::Active,
                    Some(_) => RecordState::Deleted,
                }))
            }

            async fn append_audit(
                &self,
                events: &[$crate::store::AuditEvent],
            ) -> Result<(), $crate::store::StoreError> {
                let mut tx = self.begin_write().await?;
                for event in events {
                    insert_audit_event(&mut *tx, event).await?;
                }
                tx.commit().await?;
                Ok(())
            }

            async fn ping(&self) -> Result<(), $crate::store::StoreError> {
                sqlx::query("SELECT 1").execute(&self.pool).await?;
                Ok(())
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
                let records: i64 = sqlx::query_scalar(queries::COUNT_UNDER_KEK_VERSION)
                    .bind(i64::from(version))
                    .fetch_one(&mut *tx)
                    .await?;
                if kind == "kek" && records > 0 {
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
                now: $crate::store::Micros,
            ) -> Result<(), $crate::store::StoreError> {
                sqlx::query($crate::store::queries::INSERT_REWRAP_JOB)
                    .bind(job_id)
                    .bind(i64::from(target))
                    .bind(now)
                    .execute(&self.pool)
                    .await?;
                Ok(())
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
                    return match self.record_state(&rekey.record_id).await? {
                        Some($crate::store::RecordState::Active) => Err(StoreError::VersionConflict),
                        _ => Err(StoreError::NotFound),
                    };
                };
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
                insert_audit_event(&mut *tx, audit).await?;
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

            /// The record an earlier create with the same request key made, if any.
            async fn replayed_request(
                &self,
                request: &$crate::store::CreateRequestKey,
            ) -> Result<Option<$crate::store::InsertOutcome>, $crate::store::StoreError> {
                use sqlx::Row;
                let Some(row) = sqlx::query($crate::store::queries::SELECT_CREATE_REQUEST)
                    .bind(&request.caller)
                    .bind(&request.request_id)
                    .fetch_optional(&self.pool)
                    .await?
                else {
                    return Ok(None);
                };
                let record_id: String = row.try_get("record_id")?;
                let fingerprint: Vec<u8> = row.try_get("fingerprint")?;
                let same_request = subtle::ConstantTimeEq::ct_eq(
                    fingerprint.as_slice(),
                    request.fingerprint.as_slice(),
                )
                .into();
                let meta = self.meta(&record_id).await?;
                Ok(Some($crate::store::InsertOutcome::Replayed { meta, same_request }))
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

        async fn insert_audit_event(
            conn: &mut <<$store as $crate::store::shared::Backend>::Db as sqlx::Database>::Connection,
            event: &$crate::store::AuditEvent,
        ) -> Result<(), sqlx::Error> {
            sqlx::query($crate::store::queries::INSERT_AUDIT_EVENT)
                .bind(&event.event_id)
                .bind(event.occurred_at)
                .bind(&event.caller)
                .bind(&event.peer)
                .bind(&event.rpc)
                .bind($crate::store::encode_json_list(&event.record_ids))
                .bind(&event.purpose)
                .bind(&event.justification)
                .bind($crate::store::encode_json_list(&event.released))
                .bind(&event.outcome)
                .bind(&event.reason)
                .bind(&event.request_id)
                .execute(conn)
                .await?;
            Ok(())
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
