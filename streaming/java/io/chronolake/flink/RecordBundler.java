package io.chronolake.flink;

import java.io.ByteArrayOutputStream;
import java.nio.charset.StandardCharsets;
import java.util.LinkedHashMap;
import java.util.LinkedHashSet;
import java.util.Map;
import java.util.Set;

import org.apache.flink.api.common.operators.ProcessingTimeService.ProcessingTimeCallback;
import org.apache.flink.streaming.api.operators.AbstractStreamOperator;
import org.apache.flink.streaming.api.operators.OneInputStreamOperator;
import org.apache.flink.streaming.runtime.streamrecord.StreamRecord;
import org.apache.flink.types.Row;

/**
 * Gathers source records into one bundle per source partition, so that the Python operator after it
 * is called once per bundle instead of once per record.
 *
 * <p>Input rows: (payload BYTES, partition INT, position STRING, log time ms BIGINT), in the order
 * the source emits them. Output rows: (partition INT, positions STRING, log times STRING, payload
 * lengths STRING, payloads BYTES): the three text columns are comma-separated, one entry per record,
 * and the payloads are concatenated in the same order.
 *
 * <p>A bundle leaves when it holds {@code maxRecords} records or {@code maxBytes} payload bytes,
 * every {@code maxDelayMs} milliseconds, at the end of the input and, before every checkpoint
 * barrier, in {@link #prepareSnapshotPreBarrier}: the operator holds no state, and every record
 * before a barrier has left it before the barrier does.
 *
 * <p>Before each barrier, after the last bundles, every partition that sent a bundle since the
 * previous barrier also gets a <em>checkpoint mark</em>: a row with empty positions, log times and
 * lengths and a one-byte payload. It tells the Python operators downstream to write what they keep
 * in memory into Flink state now, before the barrier reaches them (aligned checkpoints only).
 */
public final class RecordBundler extends AbstractStreamOperator<Row>
        implements OneInputStreamOperator<Row, Row>, ProcessingTimeCallback {

    private static final long serialVersionUID = 1L;

    private static final byte[] MARK_PAYLOAD = {0};

    private final int maxRecords;
    private final int maxBytes;
    private final long maxDelayMs;
    private transient Map<Integer, Bundle> bundles;
    private transient Set<Integer> sentSinceBarrier;

    public RecordBundler(int maxRecords, int maxBytes, long maxDelayMs) {
        if (maxRecords < 1 || maxBytes < 1 || maxDelayMs < 1) {
            throw new IllegalArgumentException("maxRecords, maxBytes and maxDelayMs must be positive");
        }
        this.maxRecords = maxRecords;
        this.maxBytes = maxBytes;
        this.maxDelayMs = maxDelayMs;
    }

    @Override
    public void open() throws Exception {
        super.open();
        bundles = new LinkedHashMap<>();
        sentSinceBarrier = new LinkedHashSet<>();
        schedule();
    }

    private void schedule() {
        long now = getProcessingTimeService().getCurrentProcessingTime();
        getProcessingTimeService().registerTimer(now + maxDelayMs, this);
    }

    @Override
    public void processElement(StreamRecord<Row> element) throws Exception {
        Row row = element.getValue();
        Integer partition = (Integer) row.getField(1);
        Bundle bundle = bundles.computeIfAbsent(partition, p -> new Bundle());
        bundle.add((byte[]) row.getField(0), (String) row.getField(2), (Long) row.getField(3));
        if (bundle.count >= maxRecords || bundle.payloads.size() >= maxBytes) {
            bundles.remove(partition);
            emit(partition, bundle);
        }
    }

    @Override
    public void onProcessingTime(long time) throws Exception {
        flush();
        schedule();
    }

    @Override
    public void prepareSnapshotPreBarrier(long checkpointId) throws Exception {
        super.prepareSnapshotPreBarrier(checkpointId);
        flush();
        for (Integer partition : sentSinceBarrier) {
            output.collect(new StreamRecord<>(Row.of(partition, "", "", "", MARK_PAYLOAD)));
        }
        sentSinceBarrier.clear();
    }

    @Override
    public void finish() throws Exception {
        flush();
        super.finish();
    }

    private void flush() {
        if (bundles.isEmpty()) {
            return;
        }
        Map<Integer, Bundle> full = bundles;
        bundles = new LinkedHashMap<>();
        for (Map.Entry<Integer, Bundle> entry : full.entrySet()) {
            emit(entry.getKey(), entry.getValue());
        }
    }

    private void emit(Integer partition, Bundle bundle) {
        sentSinceBarrier.add(partition);
        output.collect(new StreamRecord<>(Row.of(
                partition, bundle.positions.toString(), bundle.logTimes.toString(),
                bundle.lengths.toString(), bundle.payloads.toByteArray())));
    }

    private static final class Bundle {
        final StringBuilder positions = new StringBuilder();
        final StringBuilder logTimes = new StringBuilder();
        final StringBuilder lengths = new StringBuilder();
        final ByteArrayOutputStream payloads = new ByteArrayOutputStream();
        int count;

        void add(byte[] payload, String position, Long logTimeMs) {
            if (count > 0) {
                positions.append(',');
                logTimes.append(',');
                lengths.append(',');
            }
            positions.append(position);
            logTimes.append(logTimeMs.longValue());
            byte[] bytes = payload == null ? new byte[0] : payload;
            lengths.append(bytes.length);
            payloads.write(bytes, 0, bytes.length);
            count++;
        }
    }
}
