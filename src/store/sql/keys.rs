//! API key rows.

use async_trait::async_trait;
use sqlx::Row;

use super::{rows, to_json, SqlStore};
use crate::domain::Millis;
use crate::keys::ApiKey;
use crate::store::{KeyPatch, KeyStore, StoreResult};

/// Rates are stored as integers (thousandths per second): a nullable float
/// parameter does not bind reliably through `sqlx::Any` on Postgres.
fn rate_millis(rate: Option<f64>) -> Option<i64> {
    rate.map(|r| (r * 1000.0).round() as i64)
}

fn scopes_column(key: &ApiKey) -> String {
    key.scopes
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

#[async_trait]
impl KeyStore for SqlStore {
    async fn create_key(&self, key: &ApiKey) -> StoreResult<()> {
        sqlx::query(&format!(
            "INSERT INTO api_keys ({}) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15)",
            rows::KEY_COLUMNS
        ))
        .bind(&key.id)
        .bind(&key.prefix)
        .bind(&key.secret_hash)
        .bind(&key.name)
        .bind(scopes_column(key))
        .bind(key.mode.as_str())
        .bind(rate_millis(key.limits.rate_per_second))
        .bind(key.limits.burst)
        .bind(key.limits.daily_quota)
        .bind(key.limits.monthly_quota)
        .bind(key.limits.per_recipient_hourly)
        .bind(to_json(&key.allowed_from_domains))
        .bind(key.created_at)
        .bind(key.revoked_at)
        .bind(key.limits.timezone.as_deref())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn key_by_prefix(&self, prefix: &str) -> StoreResult<Option<ApiKey>> {
        let row = sqlx::query(&format!(
            "SELECT {} FROM api_keys WHERE prefix = $1",
            rows::KEY_COLUMNS
        ))
        .bind(prefix)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(rows::key).transpose()
    }

    async fn key(&self, id: &str) -> StoreResult<Option<ApiKey>> {
        let row = sqlx::query(&format!(
            "SELECT {} FROM api_keys WHERE id = $1",
            rows::KEY_COLUMNS
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(rows::key).transpose()
    }

    async fn list_keys(&self) -> StoreResult<Vec<ApiKey>> {
        let found = sqlx::query(&format!(
            "SELECT {} FROM api_keys ORDER BY created_at, id",
            rows::KEY_COLUMNS
        ))
        .fetch_all(&self.pool)
        .await?;
        found.iter().map(rows::key).collect()
    }

    async fn count_active_keys(&self) -> StoreResult<i64> {
        let row = sqlx::query("SELECT COUNT(*) AS n FROM api_keys WHERE revoked_at IS NULL")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get("n")?)
    }

    async fn update_key(&self, id: &str, patch: &KeyPatch) -> StoreResult<Option<ApiKey>> {
        let Some(mut key) = self.key(id).await? else {
            return Ok(None);
        };
        if let Some(name) = &patch.name {
            key.name = name.clone();
        }
        if let Some(scopes) = &patch.scopes {
            key.scopes = scopes.clone();
        }
        if let Some(mode) = patch.mode {
            key.mode = mode;
        }
        if let Some(limits) = &patch.limits {
            key.limits = limits.clone();
        }
        if let Some(domains) = &patch.allowed_from_domains {
            key.allowed_from_domains = domains.clone();
        }
        sqlx::query(
            "UPDATE api_keys SET name=$2, scopes=$3, mode=$4, rate_millis=$5, burst=$6, \
             daily_quota=$7, monthly_quota=$8, per_recipient_hourly=$9, allowed_from_domains=$10, \
             timezone=$11 WHERE id=$1",
        )
        .bind(&key.id)
        .bind(&key.name)
        .bind(scopes_column(&key))
        .bind(key.mode.as_str())
        .bind(rate_millis(key.limits.rate_per_second))
        .bind(key.limits.burst)
        .bind(key.limits.daily_quota)
        .bind(key.limits.monthly_quota)
        .bind(key.limits.per_recipient_hourly)
        .bind(to_json(&key.allowed_from_domains))
        .bind(key.limits.timezone.as_deref())
        .execute(&self.pool)
        .await?;
        Ok(Some(key))
    }

    async fn revoke_key(&self, id: &str, now: Millis) -> StoreResult<bool> {
        let done =
            sqlx::query("UPDATE api_keys SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL")
                .bind(id)
                .bind(now)
                .execute(&self.pool)
                .await?;
        Ok(done.rows_affected() > 0)
    }
}
