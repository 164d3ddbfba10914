package io.chronolake.flink;

import java.io.File;
import java.io.IOException;
import java.io.UncheckedIOException;
import java.nio.file.Files;

import org.apache.iceberg.io.FileIO;
import org.apache.iceberg.io.InputFile;
import org.apache.iceberg.io.OutputFile;
import org.apache.iceberg.io.PositionOutputStream;
import org.apache.iceberg.io.SeekableInputStream;

/**
 * Iceberg file IO for a warehouse on the local disk ({@code file:} locations, or plain paths),
 * through {@code java.io} and {@code java.nio}.
 *
 * <p>The default, {@code HadoopFileIO}, goes through Hadoop's local file system, which without
 * Hadoop's native library sets the permissions of every file it creates by running {@code chmod}
 * in a child process: two forks of the whole job JVM (file and checksum file) per data file,
 * manifest and metadata file, on the Iceberg writer's thread. The files are the same either way:
 * pyiceberg, DuckDB and the Hadoop IO read them alike (this IO writes no {@code .crc} files).
 */
public final class LocalFileIO implements FileIO {

    private static final long serialVersionUID = 1L;

    @Override
    public InputFile newInputFile(String location) {
        return new Input(location, org.apache.iceberg.Files.localInput(path(location)));
    }

    @Override
    public OutputFile newOutputFile(String location) {
        return new Output(location, org.apache.iceberg.Files.localOutput(path(location)));
    }

    @Override
    public void deleteFile(String location) {
        try {
            Files.deleteIfExists(path(location).toPath());
        } catch (IOException error) {
            throw new UncheckedIOException("cannot delete " + location, error);
        }
    }

    // Iceberg's local files report a plain path as their location; the catalog compares the
    // location it stored (a file: URI) with the one a table's metadata was read from, so files keep
    // the location they were asked for.

    private static final class Input implements InputFile {
        private final String location;
        private final InputFile file;

        Input(String location, InputFile file) {
            this.location = location;
            this.file = file;
        }

        @Override
        public long getLength() {
            return file.getLength();
        }

        @Override
        public SeekableInputStream newStream() {
            return file.newStream();
        }

        @Override
        public String location() {
            return location;
        }

        @Override
        public boolean exists() {
            return file.exists();
        }
    }

    private static final class Output implements OutputFile {
        private final String location;
        private final OutputFile file;

        Output(String location, OutputFile file) {
            this.location = location;
            this.file = file;
        }

        @Override
        public PositionOutputStream create() {
            return file.create();
        }

        @Override
        public PositionOutputStream createOrOverwrite() {
            return file.createOrOverwrite();
        }

        @Override
        public String location() {
            return location;
        }

        @Override
        public InputFile toInputFile() {
            return new Input(location, file.toInputFile());
        }
    }

    private static File path(String location) {
        if (location.startsWith("file:")) {
            // file:/a, file:///a (and the file://localhost/a form) -> /a
            String rest = location.substring("file:".length());
            if (rest.startsWith("//")) {
                rest = rest.substring(2);
                int slash = rest.indexOf('/');
                rest = slash < 0 ? "/" : rest.substring(slash);
            }
            return new File(rest);
        }
        if (location.contains("://")) {
            throw new IllegalArgumentException("LocalFileIO reads local files only, not " + location);
        }
        return new File(location);
    }
}
