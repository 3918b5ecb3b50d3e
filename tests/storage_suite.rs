//! The log store and state machine pass openraft's own storage test suite,
//! on real sled in a temporary folder.

use chatstore::shard::log_store::LogStore;
use chatstore::shard::state_machine::StateMachine;
use chatstore::shard::types::TypeConfig;
use chatstore::storage::Storage;
use chatstore::types::ShardId;
use openraft::testing::log::{StoreBuilder, Suite};
use openraft::StorageError;

struct SledBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for SledBuilder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<TypeConfig>> {
        let dir = tempfile::tempdir().expect("temp dir");
        let storage = Storage::open(dir.path()).expect("open storage");
        let log = LogStore::open(&storage, ShardId(1))
            .await
            .expect("open log store");
        let sm = StateMachine::open(&storage, ShardId(1)).expect("open state machine");
        Ok((dir, log, sm))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openraft_storage_suite() -> Result<(), StorageError<TypeConfig>> {
    Suite::test_all(SledBuilder).await
}
