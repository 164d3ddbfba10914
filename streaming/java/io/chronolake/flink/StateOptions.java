package io.chronolake.flink;

import java.util.Collection;

import org.apache.flink.contrib.streaming.state.RocksDBOptionsFactory;
import org.rocksdb.ColumnFamilyOptions;
import org.rocksdb.DBOptions;

/**
 * RocksDB options of the bitemporal job's keyed state ({@code state.backend.rocksdb.options-factory}).
 *
 * <p>Each incremental checkpoint flushes the memtables into a new level-0 file, and the key states a
 * checkpoint interval changes are a fair share of all of them, so every level-0 to level-1
 * compaction rewrites about the whole state (the key heads): with RocksDB's default trigger of four
 * level-0 files that is the whole state rewritten every fourth checkpoint. Waiting for more level-0
 * files rewrites it that many times less often; reads (only a key the operator does not hold in
 * memory) look into a few more files.
 */
public final class StateOptions implements RocksDBOptionsFactory {

    private static final long serialVersionUID = 1L;

    /** Level-0 files before a compaction into level 1 (RocksDB's default: 4). */
    static final int LEVEL0_FILES_TO_COMPACT = 16;

    @Override
    public DBOptions createDBOptions(DBOptions current, Collection<AutoCloseable> handlesToClose) {
        return current;
    }

    @Override
    public ColumnFamilyOptions createColumnOptions(
            ColumnFamilyOptions current, Collection<AutoCloseable> handlesToClose) {
        return current
                .setLevel0FileNumCompactionTrigger(LEVEL0_FILES_TO_COMPACT)
                .setLevel0SlowdownWritesTrigger(Math.max(current.level0SlowdownWritesTrigger(), 3 * LEVEL0_FILES_TO_COMPACT))
                .setLevel0StopWritesTrigger(Math.max(current.level0StopWritesTrigger(), 4 * LEVEL0_FILES_TO_COMPACT));
    }
}
