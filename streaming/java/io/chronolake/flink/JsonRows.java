package io.chronolake.flink;

import java.time.Instant;
import java.util.ArrayList;
import java.util.List;

import org.apache.flink.api.common.functions.FlatMapFunction;
import org.apache.flink.api.common.typeinfo.TypeInformation;
import org.apache.flink.api.common.typeinfo.Types;
import org.apache.flink.api.java.typeutils.ResultTypeQueryable;
import org.apache.flink.api.java.typeutils.RowTypeInfo;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.core.JsonFactory;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.core.JsonParser;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.core.JsonToken;
import org.apache.flink.types.Row;
import org.apache.flink.util.Collector;

/**
 * Turns a bundle of table rows written by the Python operators back into rows: the input's first
 * field is a JSON array of arrays (UTF-8 bytes, or a string), one per row, each holding the table's columns in the order of
 * {@code columns}. A column named in {@code micros} holds an integer, microseconds since the epoch,
 * and comes out as an {@link Instant}; every other column holds a string and comes out as one (the
 * INSERT casts it to the table's type). Any column may be null.
 */
public final class JsonRows implements FlatMapFunction<Row, Row>, ResultTypeQueryable<Row> {

    private static final long serialVersionUID = 1L;
    private static final JsonFactory JSON = new JsonFactory();

    private final String[] columns;
    private final boolean[] instants;

    public JsonRows(String[] columns, String[] micros) {
        this.columns = columns.clone();
        this.instants = new boolean[columns.length];
        java.util.Set<String> timed = new java.util.HashSet<>(java.util.Arrays.asList(micros));
        for (int i = 0; i < columns.length; i++) {
            instants[i] = timed.contains(columns[i]);
        }
    }

    @Override
    public void flatMap(Row bundle, Collector<Row> out) throws Exception {
        Object field = bundle.getField(0);
        try (JsonParser parser = field instanceof byte[] ? JSON.createParser((byte[]) field) : JSON.createParser((String) field)) {
            expect(parser.nextToken(), JsonToken.START_ARRAY);
            List<Object> values = new ArrayList<>(columns.length);
            for (JsonToken token = parser.nextToken(); token != JsonToken.END_ARRAY; token = parser.nextToken()) {
                expect(token, JsonToken.START_ARRAY);
                values.clear();
                for (token = parser.nextToken(); token != JsonToken.END_ARRAY; token = parser.nextToken()) {
                    int column = values.size();
                    if (token == JsonToken.VALUE_NULL) {
                        values.add(null);
                    } else if (column < columns.length && instants[column] && token == JsonToken.VALUE_NUMBER_INT) {
                        long micros = parser.getLongValue();
                        values.add(Instant.ofEpochSecond(Math.floorDiv(micros, 1_000_000L), Math.floorMod(micros, 1_000_000L) * 1_000L));
                    } else if (column < columns.length && !instants[column] && token == JsonToken.VALUE_STRING) {
                        values.add(parser.getText());
                    } else {
                        throw new IllegalArgumentException("row bundle: unexpected " + token + " in column " + column);
                    }
                }
                if (values.size() != columns.length) {
                    throw new IllegalArgumentException(
                            "row bundle: " + values.size() + " values for " + columns.length + " columns");
                }
                out.collect(Row.of(values.toArray()));
            }
        }
    }

    private static void expect(JsonToken token, JsonToken wanted) {
        if (token != wanted) {
            throw new IllegalArgumentException("row bundle: expected " + wanted + ", got " + token);
        }
    }

    @Override
    public TypeInformation<Row> getProducedType() {
        TypeInformation<?>[] types = new TypeInformation<?>[columns.length];
        for (int i = 0; i < columns.length; i++) {
            types[i] = instants[i] ? Types.INSTANT : Types.STRING;
        }
        return new RowTypeInfo(types, columns);
    }
}
