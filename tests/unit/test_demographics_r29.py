"""Gender/race labels of one split: a file name may repeat across splits (APPA-REAL names files per split)."""
from faceage.appa_real import read_demographics


def test_a_labels_file_with_a_split_column_gives_each_split_its_own_faces(tmp_path):
    # 000001.jpg is a train face and another person's test face: the test face must not take the train face's labels.
    (tmp_path / "sources.csv").write_text("file_name,split,gender,race\n000001.jpg,test,female,Asian\n"
                                          "000001.jpg,train,male,White\n000002.jpg,train,male,Black\n")
    assert read_demographics(tmp_path, "test") == {"000001.jpg": {"gender": "female", "race": "Asian"}}
    assert read_demographics(tmp_path, "train") == {"000001.jpg": {"gender": "male", "race": "White"},
                                                    "000002.jpg": {"gender": "male", "race": "Black"}}


def test_rows_without_a_split_count_for_every_split(tmp_path):
    (tmp_path / "labels.csv").write_text("file_name,gender\na.jpg,male\n")
    (tmp_path / "more.csv").write_text("file_name,split,race\na.jpg,,Asian\nb.jpg,valid,White\n")
    assert read_demographics(tmp_path, "test") == {"a.jpg": {"gender": "male", "race": "Asian"}}
    assert read_demographics(tmp_path) == {"a.jpg": {"gender": "male", "race": "Asian"}, "b.jpg": {"race": "White"}}


def test_the_sample_gives_its_test_faces_their_own_labels(sample_dir):
    import csv

    folder = sample_dir
    with open(folder / "sources.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "test"]
    labels = read_demographics(folder, "test")
    assert len(labels) == len(rows)
    codes = {"0": "male", "1": "female"}
    assert all(labels[r["file_name"]]["gender"] == codes[r["utk_gender(0=male,1=female)"]] for r in rows)
