"""atomic.py: files written whole or not at all, by any number of writers at once."""
import threading

import atomic


def test_writers_of_one_file_at_once_each_replace_it_whole(tmp_path):
    """report.py beside a run's last stage writes the same card and plot: with one temporary
    name for all writers, one renamed another's file away (FileNotFoundError) or half of it."""
    dest, errors = tmp_path / "card.md", []
    texts = [f"writer {i}\n" * 20_000 for i in range(4)]
    start = threading.Barrier(len(texts))

    def write(text: str):
        start.wait()
        try:
            for _ in range(25):
                atomic.write_text(dest, text)
        except Exception as e:  # collected: an assertion in a thread would pass unseen
            errors.append(e)
    threads = [threading.Thread(target=write, args=(t,)) for t in texts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert dest.read_text() in texts  # one writer's whole text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["card.md"]  # no temporary left
