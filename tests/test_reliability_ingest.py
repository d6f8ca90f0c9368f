"""Reliability of ingest on malformed landing files: real files, real Delta tables in a throwaway workspace.
A file that cannot be read as the UCI schema is refused with an error naming the file and what is wrong, and writes
nothing; a row whose ID is not written as digits is quarantined with its reason, never read as another customer."""
import pytest
from conftest import cli

from serving_mlops.config import get_environment
from serving_mlops.data import RAW_COLUMNS, generate_credit_data
from serving_mlops.ingest import IngestError, ingest_file, ingest_landing
from serving_mlops.tables import tables_for


@pytest.fixture
def env(home):
    return get_environment("dev")


def written_tables(env):
    tables = tables_for(env)
    return {n: (tables.count(n), tables.version(n)) for n in tables.list("dev", "credit")}


def test_duplicate_header_is_refused_naming_file_and_columns(env, tmp_path):
    path = tmp_path / "twice.csv"
    clients = generate_credit_data(30, seed=1)
    clients["AGE2"] = clients.AGE
    clients.columns = [*RAW_COLUMNS, " AGE"]  # a second AGE at the end (names are trimmed)
    clients.to_csv(path, index=False)
    with pytest.raises(IngestError) as e:
        ingest_file(path, env)
    assert str(e.value).startswith(f"{path}: column(s) named more than once in the header: AGE (columns 6, 26)"), e.value
    assert written_tables(env) == {}
    proc = cli("ingest", "--env", "dev", str(path), check=False, process=True)  # as users see it: one line, no traceback
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "KeyError" not in proc.stderr, proc.stderr
    assert "AGE (columns 6, 26)" in proc.stderr


@pytest.mark.parametrize("name,sep,said", [("semicolons.csv", ";", "';'"), ("tabs.csv", "\t", "tab"), ("pipes.csv", "|", "'|'")])
def test_wrong_delimiter_is_named_instead_of_every_column_missing(env, tmp_path, name, sep, said):
    path = tmp_path / name
    generate_credit_data(30, seed=2).astype(float).to_csv(path, index=False, sep=sep, decimal="," if sep == ";" else ".")
    with pytest.raises(IngestError) as e:
        ingest_file(path, env)
    assert f"{path}: the file looks {said}-separated; expected ','" in str(e.value)
    assert "missing column" not in str(e.value)
    assert written_tables(env) == {}


def test_ids_not_written_as_digits_are_quarantined_with_file_column_and_line(env, tmp_path):
    path = tmp_path / "ids.csv"
    clients = generate_credit_data(8, seed=3, first_id=500).astype(str)
    clients.loc[[1, 2, 3, 5], "ID"] = ["1e6", "1.5", "abc", "12345678901234567"]
    clients.to_csv(path, index=False)
    result = ingest_file(path, env, max_bad_fraction=1.0)
    assert (result.rows, result.quarantined) == (8, 4)
    summary = result.summary()
    assert "quarantined 2 x ID=<value> is not written as 1 to 15 digits without a sign or leading zero (first at line 3)" in summary, summary
    assert "quarantined 1 x ID=<value> is not a whole number (first at line 4)" in summary, summary
    assert "quarantined 1 x ID=<value> is not a number (first at line 5)" in summary, summary
    tables = tables_for(env)
    q = tables.read_pandas("dev.credit.quarantine_clients").sort_values("_source_row")
    assert q._source_file.unique().tolist() == [str(path.resolve())]
    assert q._source_row.tolist() == [2, 3, 4, 6]  # row n of the file is on line n + 1, under the header
    assert q.reason.tolist() == ["ID=1e6 is not written as 1 to 15 digits without a sign or leading zero", "ID=1.5 is not a whole number", "ID=abc is not a number",
                                 "ID=12345678901234567 is not written as 1 to 15 digits without a sign or leading zero"]
    assert q.ID.tolist() == ["1e6", "1.5", "abc", "12345678901234567"]  # as received
    silver = tables.read_pandas("dev.credit.silver_clients")
    assert sorted(silver.customer_id) == [500, 504, 506, 507]  # nothing became customer 1000000, 1 or 12345678901234568
    assert tables.count("dev.credit.bronze_clients") == 8  # every row received is kept


def test_a_bad_file_in_a_folder_loses_nothing_and_half_writes_nothing(env, tmp_path):
    landing = tmp_path / "landing"; landing.mkdir()
    generate_credit_data(40, seed=4).to_csv(landing / "a_good.csv", index=False)
    generate_credit_data(40, seed=5, first_id=1_000).to_csv(landing / "b_semicolons.csv", index=False, sep=";")
    with pytest.raises(IngestError) as e:
        ingest_landing(env, landing, progress=False)
    assert "1 of 2 file(s) failed" in str(e.value) and "b_semicolons.csv: the file looks ';'-separated" in str(e.value)
    after_failure = written_tables(env)
    assert {n: c for n, (c, _) in after_failure.items()} == {
        "dev.credit.bronze_clients": 40, "dev.credit.quarantine_clients": 0, "dev.credit.silver_clients": 40, "dev.credit.silver_statements": 240}
    generate_credit_data(40, seed=5, first_id=1_000).to_csv(landing / "b_semicolons.csv", index=False)  # the sender fixes the file
    ingest_landing(env, landing, progress=False)
    assert {n: c for n, (c, _) in written_tables(env).items()} == {
        "dev.credit.bronze_clients": 80, "dev.credit.quarantine_clients": 0, "dev.credit.silver_clients": 80, "dev.credit.silver_statements": 480}


def test_a_huge_field_or_a_byte_that_is_not_utf8_quarantines_its_row_and_the_file_is_ingested(env, tmp_path):
    "Arrow's reader refused the whole file: 'straddling object ... block size' for a 5 MB field, 'invalid UTF8 data' naming column #1, no line."
    huge, latin = tmp_path / "huge.csv", tmp_path / "latin.csv"
    clients = generate_credit_data(20, seed=6).astype(str)
    clients.loc[3, "BILL_AMT1"] = "9" * 5_000_000  # past Arrow's 1 MiB block; digits: the number is out of range, not text
    clients.to_csv(huge, index=False)
    lines = generate_credit_data(20, seed=7, first_id=100).to_csv(index=False).encode().split(b"\n")
    lines[5] = lines[5].replace(b",", b",\xe9", 1)  # a Latin-1 'é' before LIMIT_BAL of row 5 (line 6)
    latin.write_bytes(b"\n".join(lines))
    for path, row, reason in [(huge, 4, "BILL_AMT1=" + "9" * 40 + "... (5,000,000 characters) is "),
                              (latin, 5, "LIMIT_BAL=\ufffd")]:
        result = ingest_file(path, env, max_bad_fraction=1.0)
        assert (result.rows, result.quarantined) == (20, 1), result.summary()
        q = tables_for(env).read_pandas("dev.credit.quarantine_clients")
        bad = q[q._source_file == str(path.resolve())]
        assert bad._source_row.tolist() == [row] and bad.reason.iat[0].startswith(reason), bad.reason.tolist()
        assert len(bad.reason.iat[0]) < 200  # the reason names the value, it does not repeat 5 MB
        assert f"(first at line {row + 1})" in result.summary(), result.summary()
    assert tables_for(env).count("dev.credit.silver_clients") == 38 and tables_for(env).count("dev.credit.bronze_clients") == 40
