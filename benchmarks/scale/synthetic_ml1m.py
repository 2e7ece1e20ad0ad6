"""A synthetic data set in the MovieLens-1M format, for the scale benchmark (benchmarks/scale/scale.md).

    python -m benchmarks synthetic_ml1m --out /tmp/ml-1m-synthetic --ratings 1000000

Same files and fields as ML-1M (ratings.dat, users.dat, movies.dat, `::`-separated): 6,040 users with
gender, age bucket, occupation and zip code; 3,952 movies with a title of two to five words plus a year and
one to three genres; ratings 1-5 with user- and genre-dependent means, so labels carry a signal; timestamps
increasing, about 165 ratings per user as in ML-1M. Title lengths follow ML-1M's (about 20 characters),
so rendered texts have realistic token counts. Deterministic for a seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

GENRES = ["Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
          "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western"]
WORDS = ["love", "night", "man", "woman", "city", "dead", "life", "story", "king", "last", "house", "world", "war",
         "girl", "day", "time", "blood", "heart", "dark", "star", "river", "summer", "secret", "return", "lost",
         "american", "little", "big", "black", "white", "red", "golden", "wild", "game", "road", "home", "dream",
         "island", "moon", "fire", "ghost", "street", "father", "mother", "brother", "sister", "family", "party",
         "school", "money", "power"]
AGES = [1, 18, 25, 35, 45, 50, 56]


def generate(out: str = "/tmp/ml-1m-synthetic", ratings: int = 1_000_000, users: int = 6040, movies: int = 3952,
             seed: int = 0) -> None:
    """Write ratings.dat, users.dat and movies.dat into `out`.

    Args:
        out: the folder to write (created).
        ratings: number of ratings.
        users: number of users.
        movies: number of movies.
        seed: random seed.
    """
    rng = np.random.default_rng(seed)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "users.dat", "w") as fh:
        for u in range(1, users + 1):
            fh.write(f"{u}::{'MF'[rng.integers(2)]}::{AGES[rng.integers(len(AGES))]}::{rng.integers(21)}::"
                     f"{rng.integers(10000, 99999)}\n")
    movie_genres = []
    with open(folder / "movies.dat", "w") as fh:
        for m in range(1, movies + 1):
            title = " ".join(rng.choice(WORDS, size=rng.integers(2, 6))).title()
            genres = sorted(set(rng.choice(len(GENRES), size=rng.integers(1, 4))))
            movie_genres.append(genres)
            fh.write(f"{m}::{title} ({rng.integers(1920, 2001)})::{'|'.join(GENRES[g] for g in genres)}\n")
    taste = rng.normal(0, 1, size=(users, len(GENRES)))
    user_bias = rng.normal(3.6, 0.5, size=users)
    popularity = rng.lognormal(0.0, 1.0, size=movies)  # a long tail, as in ML-1M
    popularity /= popularity.sum()
    who = np.sort(rng.integers(0, users, size=ratings))  # grouped by user, as ML-1M's file is
    what = rng.choice(movies, size=ratings, p=popularity)
    affinity = np.array([taste[u, movie_genres[m]].mean() for u, m in zip(who, what, strict=True)])
    stars = np.clip(np.rint(user_bias[who] + 0.8 * affinity + rng.normal(0, 0.9, size=ratings)), 1, 5).astype(int)
    when = 956703932 + np.cumsum(rng.integers(0, 60, size=ratings))
    when = when[rng.permutation(ratings)]  # times interleave across users, as in the real file
    with open(folder / "ratings.dat", "w") as fh:
        fh.writelines(f"{u + 1}::{m + 1}::{s}::{t}\n" for u, m, s, t in zip(who, what, stars, when, strict=True))
    print(f"wrote {ratings:,} ratings of {users:,} users and {movies:,} movies to {folder}")

