//! What outlives a request: the shared-data keys every stage creates at configure time, the
//! deployment's secret for client-key hashes, and the config's generation.

use super::*;
use crate::policy::key::Secret;
use crate::state::cas::{self, ensure, UpdateError};
use crate::state::slots::hash_parts;
use crate::state::{generation, SharedStore, StoreError};

impl Engine {
    /// Creates every shared-data key the policies can touch, before any request does (see
    /// `SharedStore` on why inserts race); existing keys keep their state across reloads. Adopts
    /// the deployment's secret for client-key hashes (the one in shared data, or `fresh_secret`,
    /// random from the host, if this is the first config to load) and this config's generation.
    /// Returns how many keys it created.
    pub fn prepare_state(
        &self,
        store: &impl SharedStore,
        fresh_secret: u64,
    ) -> Result<usize, StoreError> {
        let mut created = usize::from(ensure(store, &self.secret_key, &Secret(fresh_secret))?);
        let secret = cas::read::<8, Secret, _>(store, &self.secret_key)?
            .map_or(fresh_secret, |(secret, _)| secret.0);
        self.secret.set(secret);
        if !self.config.degradations.is_empty() {
            // The whole compiled config, so any change to it is a new generation.
            let fingerprint = hash_parts(0, &[format!("{:?}", self.config).as_bytes()]);
            let number =
                generation::adopt(store, &self.generation_key, fingerprint).map_err(|error| {
                    match error {
                        UpdateError::Store(error) => error,
                        UpdateError::Exhausted { .. } => StoreError::CasMismatch,
                    }
                })?;
            self.generation.set(number);
        }
        created += self.prepare_limits(store)?;
        created += self.prepare_breakers(store)?;
        created += self.prepare_budgets(store)?;
        created += self.prepare_fault_slots(store)?;
        created += self.prepare_degradation_state(store)?;
        Ok(created)
    }
}
