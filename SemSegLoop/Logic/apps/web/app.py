"""The trame app: Slicer slice views and Segment Editor effects (trame-slicer) beside the
SemSegLoop panel; decisions live in panel.py, MRML in scene.py, compute in the engine service.

Everything here runs on trame's asyncio loop, the only thread that touches MRML/VTK; the engine
service is polled from that loop every 0.2 s and never runs on it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from semsegloop.apps.web import panel
from semsegloop.apps.web.rebind import rebind_effect_pipelines
from semsegloop.apps.web.scene import ImageScene
from semsegloop.errors import SemSegLoopError

log = logging.getLogger("semsegloop.web")

POLL_S = 0.2
UNCERTAINTY_OPACITY = 0.6   # of the map's uncertain pixels; confident ones are not drawn (scene.py)
SAVE_DELAY_S = 0.05   # strokes are saved this long after the last change (one save per stroke)


class WebApp:
    """One trame server showing one project; ``engine`` owns all compute (engine.py)."""

    def __init__(self, server, project_dir: Path | None, engine_factory, sample_dir: Path | None = None):
        from trame_slicer.core import LayoutManager, SlicerApp
        from trame_slicer.rca_view import register_rca_factories
        from trame_slicer.views import Layout, LayoutDirection, ViewLayoutDefinition

        self.server = server
        self.state, self.ctrl = server.state, server.controller
        self.slicer = SlicerApp()
        register_rca_factories(self.slicer.view_manager, server)
        self.layouts = LayoutManager(self.slicer.scene, self.slicer.view_manager, server)
        axial = ViewLayoutDefinition.axial_view()
        self.layouts.register_layout_dict({
            # A 2D image shows one view; a volume three slice views (no 3D view: it would be
            # rendered on the CPU after every stroke).
            "2D": Layout(LayoutDirection.Vertical, [axial]),
            "3D": Layout(LayoutDirection.Horizontal, [
                axial, Layout(LayoutDirection.Vertical, [ViewLayoutDefinition.coronal_view(),
                                                          ViewLayoutDefinition.sagittal_view()])]),
        })
        self.editor = self.slicer.segmentation_editor
        self.engine_factory = engine_factory
        self.engine = None
        self.project = None
        self.image_scene: ImageScene | None = None
        self.classes: list[dict] = []     # the page's copy of the project's classes
        self.model = panel.PanelModel()
        self._save_handle = None
        self._last_change = 0.0
        self._binding = False
        self.editor.segmentation_modified.connect(self._on_segmentation_modified)
        self._init_state(project_dir, sample_dir)
        self._build_ui()
        self.ctrl.on_server_ready.add(self._on_ready)
        if project_dir is not None and (Path(project_dir) / "project.json").exists():
            self.open_project(project_dir)
        else:
            self._set_layout("2D")

    # ------------------------------------------------------------------ state
    def _init_state(self, project_dir, sample_dir):
        s = self.state
        s.trame__title = "SemSegLoop"
        s.project_path = str(project_dir or "")
        s.new_image_path = ""
        s.new_classes = "foreground,background"
        s.new_dims = "2"     # the page's radio values are strings
        s.images = []
        s.image_id = None
        s.classes = []
        s.active_class = 1
        s.new_class_name = ""
        s.effect = "none"
        s.brush_diameter = 5.0
        s.mask_on = False
        s.mask_min = 0.0
        s.mask_max = 255.0
        s.smoothing_kernel_mm = 3.0
        s.edit_target = "labels"
        s.time_budget_s = 30.0
        s.train_steps = 0
        s.predict_after_train = True
        s.show_uncertainty = True
        s.export_dir = ""
        s.fractions_rows = []
        s.fractions_csv = ""
        s.prediction_shown = ""
        s.prediction_edits = 0
        s.labels_saved = 0
        s.labels_changed = 0
        s.uncertainty_shown = False
        s.has_refine = False
        s.has_suggest = False
        s.update(self.model.view())

    def _push(self):
        """Copy the panel model into trame state (call inside ``with self.state``)."""
        self.state.update(self.model.view())

    # ------------------------------------------------------------------ project / image
    def open_project(self, path) -> None:
        from semsegloop.project import Project

        self.project = Project.open(path, read_only=True)   # the service is the writer
        self.state.project_path = str(self.project.path)
        self._ranking = None
        self.state.export_dir = str(self.project.path / "results")
        self._refresh_classes()
        self._refresh_images()
        self.model.round = self.project.round
        if self.engine is not None:
            self.engine.close()
        self.engine = self.engine_factory(self.project.path)
        self._set_layout("2D" if self.project.dims == 2 else "3D")
        ids = self.project.image_ids
        if ids:
            self.select_image(ids[0])
        self._push()

    def create_project(self) -> None:
        """Open the project folder typed on the page, or make it from the image file/folder
        typed below it (the page offers this when no project was given)."""
        from semsegloop.project import Project

        if self.model.busy:
            raise panel.WebInputError("wait for the running work to end before opening a project")
        target, source, names, dims = panel.new_project_request(
            self.state.project_path, self.state.new_image_path, self.state.new_classes,
            self.state.new_dims)
        if source is not None:
            with Project.create(target, names, dims=dims) as project:
                project.add_image(source)
        self.open_project(target)

    def _refresh_classes(self):
        # The page's copy: class edits apply to it at once, before the service has stored them.
        self.classes = [dict(c) for c in self.project.classes]
        self.state.classes = panel.classes_for_page(self.classes)

    def _refresh_images(self):
        # The Suggest ranking comes from the service's "suggest" op (it may predict images).
        self.state.images = panel.images_for_page(self.project, self._ranking)

    def select_image(self, image_id) -> None:
        self._flush_labels()
        if self.image_scene is not None:
            self.editor.deactivate_effect()
            self.image_scene.remove()
        image = self.project.image(image_id)
        self.image_scene = ImageScene(self.slicer.scene, image, self.classes,
                                      self.project.labels(image_id))
        self.state.image_id = image_id
        self.slicer.display_manager.show_volume_in_slice_background(self.image_scene.volume)
        self.slicer.display_manager.show_volume_in_slice_foreground(None)
        self.slicer.display_manager.reset_views()
        self._bind_editor()
        self.state.prediction_shown = ""
        if self.project.round and self.project.prediction_path(image_id) is not None:
            self._show_prediction_file(image_id, self.project.round)

    def _bind_editor(self):
        node = (self.image_scene.prediction_node if self.state.edit_target == "prediction"
                and self.image_scene.prediction_node is not None else self.image_scene.labels_node)
        self._binding = True      # set_active_segmentation re-emits segmentation_modified
        try:
            self.editor.set_active_segmentation(node, self.image_scene.volume)
            self.editor.set_surface_representation_enabled(False)
        finally:
            self._binding = False
        self._select_class_segment()
        self._apply_effect()

    def _set_layout(self, name):
        self.layouts.set_layout(name)
        rebind_effect_pipelines(self.editor, self.slicer.view_manager)

    # ------------------------------------------------------------------ editing
    def _select_class_segment(self):
        if self.image_scene is None:
            return
        ids = (self.image_scene.prediction_ids if self.editor.active_segmentation_node is
               self.image_scene.prediction_node else self.image_scene.segment_ids)
        k = int(self.state.active_class or 1)
        if 1 <= k <= len(ids):
            self.editor.set_active_segment_id(ids[k - 1])

    def _apply_effect(self):
        from trame_slicer.segmentation import (SegmentationEffectDraw, SegmentationEffectErase,
                                               SegmentationEffectPaint, SegmentationEffectSmoothing)
        from trame_slicer.segmentation.segmentation_effect_smoothing import SmoothingEffectMode

        if self.image_scene is None:
            return
        kinds = {"paint": SegmentationEffectPaint, "erase": SegmentationEffectErase,
                 "draw": SegmentationEffectDraw, "smoothing": SegmentationEffectSmoothing}
        self._select_class_segment()
        self._apply_mask()
        kind = kinds.get(self.state.effect)
        if kind is None:
            self.editor.deactivate_effect()
            return
        effect = self.editor.set_active_effect_type(kind)
        rebind_effect_pipelines(self.editor, self.slicer.view_manager)
        if hasattr(effect, "set_brush_diameter"):
            effect.set_brush_diameter(float(self.state.brush_diameter))
        if kind is SegmentationEffectSmoothing:
            effect.set_smoothing_mode(SmoothingEffectMode.MEDIAN)
            effect.set_kernel_size(float(self.state.smoothing_kernel_mm))

    def _apply_mask(self):
        """Threshold-masked painting: strokes land only where the image is within [min, max]."""
        node = self.editor.editor_node
        node.SetSourceVolumeIntensityMask(bool(self.state.mask_on))
        lo, hi = panel.mask_range(self.state.mask_min, self.state.mask_max)
        node.SetSourceVolumeIntensityMaskRange(lo, hi)

    def smooth_whole_segment(self):
        from trame_slicer.segmentation import SegmentationEffectSmoothing
        from trame_slicer.segmentation.segmentation_effect_smoothing import SmoothingEffectMode

        effect = self.editor.get_effect(SegmentationEffectSmoothing)
        self.editor.set_active_effect(effect)
        self._select_class_segment()
        effect.set_kernel_size(float(self.state.smoothing_kernel_mm))
        effect.apply_smoothing(smoothing_mode=SmoothingEffectMode.MEDIAN)
        self._apply_effect()

    def _on_segmentation_modified(self, *_):
        if self.image_scene is None or self._binding:
            return
        if (self.image_scene.prediction_node is not None and
                self.editor.active_segmentation_node is self.image_scene.prediction_node):
            with self.state:   # the page says the prediction was edited (Copy takes the edit)
                self.state.prediction_edits += 1
            return
        if self.editor.active_segmentation_node is not self.image_scene.labels_node:
            return
        with self.state:   # the page counts edits (the browser test times strokes by it)
            self.state.labels_changed += 1
        self._last_change = time.perf_counter()
        loop = asyncio.get_event_loop_policy().get_event_loop()
        if self._save_handle is None:
            self._save_handle = loop.call_later(SAVE_DELAY_S, self._save_labels_now)

    def _save_labels_now(self):
        self._save_handle = None
        with self.state:
            try:
                self._flush_labels()
            except SemSegLoopError as e:
                self.model.fail(str(e))
                self._push()

    def _flush_labels(self):
        """Write the labels on screen into the project (only when they changed)."""
        if self.image_scene is None or self.project is None or self._last_change == 0.0:
            return
        self._last_change = 0.0
        labels = self.image_scene.labels()
        self.engine.save_labels(self.state.image_id, labels)
        self.state.labels_saved += 1

    # ------------------------------------------------------------------ engine
    def _snapshot(self) -> dict | None:
        """The labels on screen, sent with Train/Predict (strokes still being saved included)."""
        if self.image_scene is None:
            return None
        self._last_change = 0.0
        if self._save_handle is not None:
            self._save_handle.cancel()
            self._save_handle = None
        return {self.state.image_id: self.image_scene.labels()}

    def train(self):
        request = self.model.start_train(self.state.time_budget_s, self.state.train_steps)
        self.engine.train(labels=self._snapshot(), **request)

    def _train_or_stop(self):
        if self.model.busy == "train":
            self.stop()
        else:
            self.train()

    def stop(self):
        self.model.stopping()
        self.engine.cancel()

    def predict(self, scope):
        ids = [self.state.image_id] if scope == "current" else None
        self.model.start_predict(scope)
        self.engine.predict(ids, uncertainty=bool(self.state.show_uncertainty),
                            labels=self._snapshot())

    def copy_prediction(self):
        if self.image_scene is None:
            raise panel.WebInputError("open an image first")
        added = self.image_scene.copy_prediction_into_labels()
        self._last_change = time.perf_counter()
        self._flush_labels()
        self.model.say(panel.copied_message(added, self.project.class_names))

    def export(self):
        self.model.start_job("export")
        self.engine.export(str(Path(self.state.export_dir or self.project.path / "results")))

    def fractions(self):
        self.model.start_job("fractions")
        self.engine.fractions(str(self.project.path / "results" / "class_fractions.csv"))

    def refine(self):
        """Correct the shown prediction with the labels on screen, without retraining."""
        if self.image_scene is None:
            raise panel.WebInputError("open an image first")
        self.model.start_job("refine")
        self.engine.refine(self.state.image_id, self.image_scene.labels())

    def suggest(self):
        self.model.start_job("suggest")
        self.engine.suggest(n=max(1, len(self.project.image_ids)))

    def _reopen(self):
        """Read the project again (the service is its writer; the page only reads it)."""
        from semsegloop.project import Project

        self.project = Project.open(self.project.path, read_only=True)

    def _on_engine_event(self, ev: dict):
        if ev.get("job") == "edit":
            if ev.get("event") == "error":
                self.model.fail(f"saving {ev.get('op', 'an edit')} failed: {ev.get('message')}")
                if ev.get("op") == "set_classes":   # show the classes as they are stored
                    self._reopen()
                    self._refresh_classes()
                    if self.image_scene is not None:
                        self.image_scene.set_classes(self.classes)
            elif ev.get("event") == "done":
                # Classes on the page are already the edited ones (a later edit may be queued).
                self._reopen()
                if ev.get("op") == "set_labels":
                    self._refresh_images()
            return
        if ev.get("job") == "service" and ev.get("event") == "ready":
            ops = set(ev.get("ops") or ())
            self.state.has_refine, self.state.has_suggest = "refine" in ops, "suggest" in ops
            return
        if ev.get("job") == "service" and ev.get("event") == "crashed":
            self.model.on_event(ev)
            return
        if ev.get("job") != "panel":
            return
        outcome = self.model.on_event(ev)
        if outcome is None:
            return
        self._reopen()
        if outcome == "train_done":
            self.model.round = self.project.round
            if self.state.predict_after_train and self.project.round:
                self.predict("current")
        elif outcome == "predict_done":
            if self.state.image_id in (ev.get("outputs") or {}):
                unc = (ev.get("uncertainty") or {}).get(self.state.image_id)
                self._show_prediction_file(self.state.image_id, int(ev.get("round") or self.project.round),
                                           self.project.path / unc if unc else None)
            self._refresh_images()
        elif outcome == "fractions_done":
            rows, csv_text = panel.read_fractions(Path(ev.get("csv_path") or
                                                       self.project.path / "results" / "class_fractions.csv"))
            self.state.fractions_rows, self.state.fractions_csv = rows, csv_text
        elif outcome == "suggest_done":
            self._ranking = ev.get("suggestions") or []
            self._refresh_images()
            self.model.say(panel.suggest_message(self._ranking, self.project))
        elif outcome == "refine_done":
            from semsegloop.data import imageio

            if ev.get("image_id") == self.state.image_id and ev.get("output"):
                labels, _ = imageio.read_labels(self.project.path / ev["output"])
                self.image_scene.show_prediction(labels, int(ev.get("round") or self.project.round),
                                                 refined=True)
                self._show_uncertainty_layer()
                self.state.prediction_shown = f"SemSegLoop round {self.image_scene.prediction_round} refined"
                self.state.prediction_edits = 0
                if self.state.edit_target == "prediction":
                    self._bind_editor()
            self._refresh_images()
        elif outcome == "export_done":
            self.model.say(f"Exported {len(ev.get('outputs') or [])} label maps to {self.state.export_dir}.")

    def _show_prediction_file(self, image_id, round_index, uncertainty_path=None):
        from semsegloop.data import imageio

        p = self.project.prediction_path(image_id, round_index)
        if p is None:
            return
        labels, _ = imageio.read_labels(p)
        if uncertainty_path is None:
            candidate = p.with_name(f"{image_id}_uncertainty.nrrd")
            uncertainty_path = candidate if candidate.exists() else None
        unc = (panel.read_uncertainty(uncertainty_path)
               if self.state.show_uncertainty and uncertainty_path is not None else None)
        self.image_scene.show_prediction(labels, round_index, unc)
        self._show_uncertainty_layer()
        self.state.prediction_shown = f"SemSegLoop round {round_index}"
        self.state.prediction_edits = 0
        if self.state.edit_target == "prediction":
            self._bind_editor()

    def _show_uncertainty_layer(self):
        """The uncertainty map as the slice views' foreground while "Show uncertainty" is on."""
        fg = self.image_scene.uncertainty_node if self.image_scene is not None else None
        on = fg is not None and bool(self.state.show_uncertainty)
        for view in self.slicer.view_manager.get_slice_views():
            view.set_foreground_volume_id(fg.GetID() if on else None)
            if on:
                view.set_foreground_opacity(UNCERTAINTY_OPACITY)
        self.state.uncertainty_shown = on

    async def _poll(self):
        while True:
            await asyncio.sleep(POLL_S)
            if self.engine is None:
                continue
            events = self.engine.poll()
            if not events and not self.model.busy:
                continue
            with self.state:
                for ev in events:
                    try:
                        self._on_engine_event(ev)
                    except SemSegLoopError as e:
                        self.model.fail(str(e))
                self._push()

    def _on_ready(self, **_):
        asyncio.get_event_loop_policy().get_event_loop().create_task(self._poll())

    # ------------------------------------------------------------------ UI
    def _guarded(self, fn):
        """Run a button's action; a SemSegLoopError becomes the page's error line."""
        def run(*args, **kwargs):
            try:
                fn(*args, **kwargs)
            except SemSegLoopError as e:
                self.model.fail(str(e))
            self._push()
        return run

    def _build_ui(self):
        from semsegloop.apps.web.page import build_page

        build_page(self)

    # trame state callbacks (registered in page.py)
    def on_effect(self, **_):
        self._apply_effect()

    def on_active_class(self, **_):
        self._select_class_segment()

    def on_show_uncertainty(self, **_):
        """Toggle the overlay; a prediction shown without its map reads the map from disk now
        (the prediction on screen, edits included, stays)."""
        sc = self.image_scene
        if sc is None or sc.prediction_node is None:
            return
        if self.state.show_uncertainty and sc.uncertainty_node is None and not sc.prediction_refined:
            p = self.project.prediction_path(self.state.image_id, sc.prediction_round)
            candidate = p.with_name(f"{self.state.image_id}_uncertainty.nrrd") if p is not None else None
            if candidate is not None and candidate.exists():
                sc.set_uncertainty(panel.read_uncertainty(candidate))
        self._show_uncertainty_layer()

    def on_edit_target(self, **_):
        if self.image_scene is not None:
            self._bind_editor()

    def _need_project(self):
        if self.project is None:
            raise panel.WebInputError("open or create a project first")

    def on_rename(self, value, name):
        self._need_project()
        try:
            classes = panel.rename_class(self.classes, int(value), name)
        except panel.WebInputError:
            self.state.dirty("classes")   # the field shows the stored name again
            raise
        self._set_classes(classes)

    def on_color(self, value, color):
        self._need_project()
        self._set_classes(panel.recolor_class(self.classes, int(value), color))

    def add_class(self):
        self._need_project()
        self._set_classes(panel.add_class(self.classes, self.state.new_class_name))
        self.state.new_class_name = ""

    def _set_classes(self, classes):
        self.engine.set_classes(classes)
        self.classes = [dict(c) for c in classes]
        if self.image_scene is not None:
            self.image_scene.set_classes(classes)
        self.state.classes = panel.classes_for_page(classes)
