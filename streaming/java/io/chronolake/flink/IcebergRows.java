package io.chronolake.flink;

import java.io.IOException;
import java.util.HashMap;
import java.util.Map;

import org.apache.flink.streaming.api.datastream.DataStream;
import org.apache.flink.streaming.api.datastream.DataStreamSink;
import org.apache.flink.table.data.RowData;
import org.apache.flink.table.types.logical.RowType;
import org.apache.flink.types.Row;
import org.apache.hadoop.conf.Configuration;
import org.apache.iceberg.Table;
import org.apache.iceberg.catalog.TableIdentifier;
import org.apache.iceberg.flink.CatalogLoader;
import org.apache.iceberg.flink.FlinkSchemaUtil;
import org.apache.iceberg.flink.TableLoader;
import org.apache.iceberg.flink.sink.FlinkSink;

/**
 * Appends one table's row bundles ({@link JsonRows}) to it through Iceberg's Flink sink, with
 * explicit operator uids: {@code rows-<table>} for the unbundling and {@code iceberg-<table>-...} for
 * the sink's writer and committer, so that a changed job still finds the committer's state in a
 * checkpoint (a Flink SQL INSERT would leave the sink's uids to the planner, derived from the whole
 * job graph). Each checkpoint is one Iceberg commit per table.
 */
public final class IcebergRows {

    private IcebergRows() {}

    /**
     * @param catalog the catalog's properties as Flink SQL's {@code CREATE CATALOG} takes them
     *     ({@code catalog-impl} and the implementation's own properties)
     */
    public static DataStreamSink<Void> append(
            DataStream<Row> bundles, String[] columns, String[] micros,
            String catalogName, Map<String, String> catalog, String namespace, String table) throws IOException {
        Map<String, String> properties = new HashMap<>(catalog);
        properties.remove("type");
        String impl = properties.remove("catalog-impl");
        CatalogLoader catalogLoader = CatalogLoader.custom(catalogName, properties, new Configuration(), impl);
        // The sink keeps serializable copies of the table and of the loader (the committer opens its
        // own where it runs): this open catalog is needed only to read the table's schema.
        try (TableLoader tableLoader = TableLoader.fromCatalog(catalogLoader, TableIdentifier.of(namespace, table))) {
            tableLoader.open();
            Table loaded = tableLoader.loadTable();
            RowType rowType = FlinkSchemaUtil.convert(loaded.schema());
            DataStream<RowData> rows = bundles
                    .flatMap(new JsonRows(columns, micros, rowType))
                    .uid("rows-" + table)
                    .name("rows-" + table);
            return FlinkSink.forRowData(rows)
                    .table(loaded)
                    .tableLoader(tableLoader)
                    .uidPrefix("iceberg-" + table)
                    .append();
        }
    }
}
