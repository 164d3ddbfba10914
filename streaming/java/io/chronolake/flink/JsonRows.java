package io.chronolake.flink;

import java.math.BigDecimal;
import java.time.LocalDate;
import java.time.LocalDateTime;
import java.util.Arrays;
import java.util.HashSet;
import java.util.Set;

import org.apache.flink.api.common.functions.FlatMapFunction;
import org.apache.flink.api.common.typeinfo.TypeInformation;
import org.apache.flink.api.java.typeutils.ResultTypeQueryable;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.core.JsonFactory;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.core.JsonParser;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.core.JsonToken;
import org.apache.flink.table.data.DecimalData;
import org.apache.flink.table.data.GenericRowData;
import org.apache.flink.table.data.RowData;
import org.apache.flink.table.data.StringData;
import org.apache.flink.table.data.TimestampData;
import org.apache.flink.table.runtime.typeutils.InternalTypeInfo;
import org.apache.flink.table.types.logical.DecimalType;
import org.apache.flink.table.types.logical.LogicalType;
import org.apache.flink.table.types.logical.RowType;
import org.apache.flink.types.Row;
import org.apache.flink.util.Collector;

/**
 * Turns a bundle of table rows written by the Python operators into the table's rows: the input's
 * first field is a JSON array of arrays (UTF-8 bytes, or a string), one per row, each holding the
 * columns named in {@code columns}, in that order. A column named in {@code micros} holds an integer,
 * microseconds since the epoch; every other column holds its value as text (written by
 * {@code chronolake.streaming.transactions}: decimals in plain notation, dates {@code yyyy-MM-dd},
 * timestamps {@code yyyy-MM-dd HH:mm:ss.ffffff} UTC, doubles as Python prints them, booleans
 * {@code true}/{@code false}). Any column may be null. The output rows have the table's schema
 * ({@code rowType}, in its column order), as Iceberg's Flink sink writes them.
 */
public final class JsonRows implements FlatMapFunction<Row, RowData>, ResultTypeQueryable<RowData> {

    private static final long serialVersionUID = 2L;
    private static final JsonFactory JSON = new JsonFactory();

    private final RowType rowType;
    private final int[] positions;
    private final LogicalType[] types;
    private final boolean[] instants;

    public JsonRows(String[] columns, String[] micros, RowType rowType) {
        this.rowType = rowType;
        if (columns.length != rowType.getFieldCount()) {
            throw new IllegalArgumentException("row bundles carry " + Arrays.toString(columns)
                    + " but the table has " + rowType.getFieldNames());
        }
        Set<String> timed = new HashSet<>(Arrays.asList(micros));
        this.positions = new int[columns.length];
        this.types = new LogicalType[columns.length];
        this.instants = new boolean[columns.length];
        for (int i = 0; i < columns.length; i++) {
            positions[i] = rowType.getFieldIndex(columns[i]);
            if (positions[i] < 0) {
                throw new IllegalArgumentException("the table has no column " + columns[i] + ": " + rowType.getFieldNames());
            }
            types[i] = rowType.getTypeAt(positions[i]);
            instants[i] = timed.contains(columns[i]);
        }
    }

    @Override
    public void flatMap(Row bundle, Collector<RowData> out) throws Exception {
        Object field = bundle.getField(0);
        try (JsonParser parser = field instanceof byte[] ? JSON.createParser((byte[]) field) : JSON.createParser((String) field)) {
            expect(parser.nextToken(), JsonToken.START_ARRAY);
            for (JsonToken token = parser.nextToken(); token != JsonToken.END_ARRAY; token = parser.nextToken()) {
                expect(token, JsonToken.START_ARRAY);
                GenericRowData row = new GenericRowData(positions.length);
                int column = 0;
                for (token = parser.nextToken(); token != JsonToken.END_ARRAY; token = parser.nextToken(), column++) {
                    if (column >= positions.length) {
                        throw new IllegalArgumentException("row bundle: more than " + positions.length + " values in a row");
                    }
                    row.setField(positions[column], value(parser, token, column));
                }
                if (column != positions.length) {
                    throw new IllegalArgumentException("row bundle: " + column + " values for " + positions.length + " columns");
                }
                out.collect(row);
            }
        }
    }

    private Object value(JsonParser parser, JsonToken token, int column) throws Exception {
        if (token == JsonToken.VALUE_NULL) {
            return null;
        }
        if (instants[column]) {
            expect(token, JsonToken.VALUE_NUMBER_INT);
            long micros = parser.getLongValue();
            return TimestampData.fromEpochMillis(Math.floorDiv(micros, 1_000L), (int) Math.floorMod(micros, 1_000L) * 1_000);
        }
        expect(token, JsonToken.VALUE_STRING);
        String text = parser.getText();
        LogicalType type = types[column];
        switch (type.getTypeRoot()) {
            case CHAR:
            case VARCHAR:
                return StringData.fromString(text);
            case BOOLEAN:
                return Boolean.parseBoolean(text);
            case INTEGER:
                return Integer.parseInt(text);
            case BIGINT:
                return Long.parseLong(text);
            case DOUBLE:
                return Double.parseDouble(text);
            case DECIMAL: {
                DecimalType decimal = (DecimalType) type;
                BigDecimal parsed = new BigDecimal(text);
                DecimalData found = DecimalData.fromBigDecimal(parsed, decimal.getPrecision(), decimal.getScale());
                if (found == null || (parsed.scale() > decimal.getScale() && parsed.stripTrailingZeros().scale() > decimal.getScale())) {
                    throw new IllegalArgumentException("row bundle: " + text + " is not exactly a " + type);  // never rounded
                }
                return found;
            }
            case DATE:
                return (int) LocalDate.parse(text).toEpochDay();
            case TIMESTAMP_WITHOUT_TIME_ZONE:
            case TIMESTAMP_WITH_LOCAL_TIME_ZONE:
                // UTC wall-clock text: the same instant either way, as the table stores it.
                return TimestampData.fromLocalDateTime(LocalDateTime.parse(text.replace(' ', 'T')));
            default:
                throw new IllegalArgumentException("row bundle: no conversion to " + type);
        }
    }

    private static void expect(JsonToken token, JsonToken wanted) {
        if (token != wanted) {
            throw new IllegalArgumentException("row bundle: expected " + wanted + ", got " + token);
        }
    }

    @Override
    public TypeInformation<RowData> getProducedType() {
        return InternalTypeInfo.of(rowType);
    }
}
