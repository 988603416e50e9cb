"""Scaling analysis of the BioVFM-21M study (PAPER.md "Scaling analysis").

Reads a results table (one row per run, benchmark and metric; see
results.COLUMNS), fits ln(100 x AUC) = a + b ln(N) per benchmark and
objective (b: the scaling benefit), tabulates benchmark factors and
correlates them with the slopes. The API the scaling notebook calls:

    from biovfm_jax import analysis
    df = analysis.load_results(path=None)          # None: the paper's table
    slopes = analysis.fit_slopes(df, x="params_total")   # or params_encoder,
                                    # train_flops, images_seen; bootstrap=1000
    slopes["flag"]     # "" or why b is no result: "fewer than 3 sizes", "within
                       # seed noise", "no measurable effect" (fit.py's rules)
    effects = analysis.axis_effects(df)   # each label -> the next, per benchmark,
                       # in percentage points with a 95% interval (effects.py)
    factors = analysis.factor_table(benchmarks, objectives=("dinov2", "mae"),
                                    features_dirs={"mae": DIR}, npz_dir=DIR)
    corr = analysis.correlations(slopes, factors)
    analysis.plot_curves(df, slopes, "curves.png")  # returns the Figure
    analysis.plot_slopes(slopes, path)
    analysis.plot_factors(slopes, factors, corr, path)
    print(analysis.markdown(analysis.slope_table(slopes)))   # beside the paper's;
                                    # flagged b bracketed "(0.0123)"
    print(analysis.markdown(analysis.correlation_table(corr), digits=2))

Results and factor tables carry their notes (skipped groups, missing
features) in `.attrs["notes"]`. The paper's slopes come out of the published
table with x="params_total" (its size axis; see published.py). Command line:

    python -m biovfm_jax.analysis fit [--results=FILE] --out=DIR [--x=params_total]
        [--features_dir=OBJECTIVE=DIR ...] [--npz_dir=DIR --image_size=224]
    python -m biovfm_jax.analysis published --paper=PAPER.md [--overwrite]
"""
from biovfm_jax.analysis import effects
from biovfm_jax.analysis.compare import correlation_table, markdown, slope_table
from biovfm_jax.analysis.effects import axis_effects
from biovfm_jax.analysis.factors import (correlations, davies_bouldin, factor_table,
                                         gzip_ratio, static_factors)
from biovfm_jax.analysis.fit import fit_line, fit_slopes, flagged, measurable, scaling_points
from biovfm_jax.analysis.plots import plot_curves, plot_factors, plot_slopes
from biovfm_jax.analysis.results import (COLUMNS, PUBLISHED_CSV, ResultsError,
                                         check_results, load_results)
